"""MLflow and Dagster glue of the ``model`` and ``latents`` assets: tracking, records, metadata.

The work itself is the library's (:func:`phenocoder_lib.pipeline.train_model`,
:func:`phenocoder_lib.pipeline.encode_well`); TensorFlow and MLflow are imported inside the functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dagster import AssetCheckResult, AssetExecutionContext, MaterializeResult, MetadataValue

from ..configs import LatentsConfig, ModelConfig
from ..resources import MLflowTracking, PhenocoderStorage, run_name
from ..state import MODEL_INFO, SUMMARY, model_tag, read_json
from ._common import (
    LATENTS_FILE,
    PREVIEW_FILE,
    SDATA_FILE,
    Timer,
    array_digest,
    check_known_samples,
    digest,
    number,
    preview_metadata,
    read_version,
    write_png,
    write_version,
)

MODEL_FILE = "model.keras"
MODEL_CONFIG_FILE = "model_config.json"
NORMALIZATION_FILE = "normalization.json"  # = phenocoder_lib.pipeline.NORMALIZATION_FILE (no TensorFlow import here)
#: Checks of the ``latents`` asset.
CHECK_EVERY_OBJECT = "every_object_has_a_latent"
CHECK_FINITE = "latents_finite"


#: History keys logged to MLflow under another name.
METRIC_NAMES = {"learning_rate": "lr"}
#: Metrics per epoch that are logged (when present in the history).
EPOCH_METRICS = ("loss", "reconstruction_loss", "kl_loss", "val_loss", "val_reconstruction_loss", "val_kl_loss",
                 "learning_rate", "epoch_seconds", "train_patches_per_s")
#: Pictures the library writes next to the model, shown on the model page (metadata key -> file).
PICTURES = {"reconstructions": "reconstructions.png", "latent_space": "latent_space.png", "curves": "history.png"}
PICTURE_TITLES = {"reconstructions": "validation patches: input | reconstruction",
                  "latent_space": "validation latents", "curves": "training curves"}
ARTIFACTS = (MODEL_FILE, MODEL_CONFIG_FILE, NORMALIZATION_FILE, "history.json", "history.csv", "history.png",
             "reconstructions.png", "latent_space.png")


def code_version() -> str:
    """``<phenocoder version>`` plus the git commit of the source tree when there is one."""
    import subprocess

    from phenocoder_lib import __version__

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _training_obs(storage: PhenocoderStorage, samples: list[str], table_key: str, conditions: list[str]) -> Any:
    """The ``.obs`` of the training samples' object tables when a condition needs one (else None)."""
    if not set(conditions) - {"dataset", "sample", "z", "y", "x"}:
        return None
    import anndata as ad
    import spatialdata

    tables = [spatialdata.read_zarr(storage.local_path("sdata", s) / SDATA_FILE,
                                    selection=("tables",)).tables[table_key] for s in samples]
    return ad.concat(tables, merge="first").obs


def train_and_track(context: AssetExecutionContext, config: ModelConfig, storage: PhenocoderStorage,
                    tracking: MLflowTracking) -> MaterializeResult:
    """Body of the ``model`` asset: train on the chosen samples' datasets, log and register in MLflow."""
    import mlflow
    import mlflow.keras

    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.patches import SETTINGS_FILE
    from phenocoder_lib.pipeline import train_model

    from ..previews import png_markdown

    check_known_samples(context, list(config.samples), "ModelConfig.samples")
    samples = list(config.samples) or storage.partitions("patches")
    if not samples:
        raise FileNotFoundError("no patch datasets yet: materialize 'patches' for some samples first.")
    missing = [s for s in samples if not storage.exists("patches", s)]
    if missing:
        raise FileNotFoundError(f"samples {missing} have no patch dataset; materialize 'patches' for them first "
                                f"or leave them out of ModelConfig.samples.")
    dataset_dirs = [storage.local_path("patches", s) for s in samples]
    settings = read_json(dataset_dirs[0] / SETTINGS_FILE)
    input_shape = [*settings["patch_size"], len(settings["channels"])]
    keys = read_json(storage.local_path("sdata", samples[0]) / SUMMARY)
    obs = _training_obs(storage, samples, keys["table_key"], list(config.conditions))
    # Asset jobs that the UI builds on the fly ("Materialize") have internal names such as __ASSET_JOB.
    job = context.job_name if context.job_name and not context.job_name.startswith("__") else "materialize"
    tags = {"dagster.run_id": context.run.run_id, "dagster.job": job, "dagster.asset": "model",
            "dagster.partition_set": ",".join(samples), "code_version": code_version(),
            "mlflow.note.content": f"Dagster run {context.run.run_id} (job {job}) materialized the `model` asset "
                                  f"on {len(samples)} samples: {', '.join(samples)}."}
    params = {**config.model_kwargs(input_shape), **config.train_kwargs(), "n_samples": len(samples),
              "patch_normalization": json.dumps({k: settings["normalization"][k]
                                                 for k in ("scale", "scale_per_sample", "scale_percentile")})}
    params.pop("memory_budget_bytes")
    timer = Timer()
    name = tracking.registered_model_name
    def _log_epoch(epoch: int, metrics: dict) -> None:  # live in the MLflow UI while training runs
        # Keras reports float32 values; 7 significant digits drop the float64 noise (lr 0.0010000000474974513).
        mlflow.log_metrics({METRIC_NAMES.get(k, k): float(f"{float(v):.7g}") for k, v in metrics.items()
                            if k in EPOCH_METRICS}, step=epoch)

    with storage.stage("model") as out:
        out.mkdir()
        # the Dagster run's short id tells two trainings on the same samples apart in MLflow's comparison
        with tracking.start_run(run_name=f"{run_name('model', samples)} ({context.run.run_id[:8]})",
                                tags=tags) as run:
            mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, tuple, dict)) or v is None else v
                               for k, v in params.items()})
            with timer.phase("train"):
                trained = train_model(
                    dataset_dirs, out, config.model_kwargs(input_shape), obs=obs, verbose=0, on_epoch_end=_log_epoch,
                    keys={k: keys[k] for k in ("table_key", "sample_key", "image_key")}, **config.train_kwargs())
            history = trained.history
            n_epochs_run = len(history.get("loss", []))
            with timer.phase("log"):
                for artifact in ARTIFACTS:
                    if (out / artifact).exists():
                        mlflow.log_artifact(str(out / artifact))
                logged = mlflow.keras.log_model(trained.model, name="model", registered_model_name=name,
                                                pip_requirements=[f"phenocoder=={code_version().split('+')[0]}"])
            version = str(logged.registered_model_version)
            mlflow.set_tag("registered_model", f"{name}/{version}")
        info = {
            "registered_model_name": name, "version": version, "model_uri": f"models:/{name}/{version}",
            "run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
            "tracking_uri": tracking.display_tracking_uri(), "model_name": trained.config["model_name"],
            "samples": samples, "dagster_run_id": context.run.run_id,
            "patches": {"patch_size": settings["patch_size"], "spatial_key_index": settings["spatial_key_index"],
                        "scale": settings["normalization"]["scale"],
                        "scale_percentile": settings["normalization"]["scale_percentile"],
                        "scale_per_sample": settings["normalization"]["scale_per_sample"],
                        "metadata_keys": settings.get("metadata_keys", [])},
        }
        write_json_atomic(out / MODEL_INFO, info)
        # content digest: the weights and the normalization that encoding reproduces. A retraining that
        # yields other weights makes every latents partition STALE; an identical one leaves them FRESH.
        data_version = write_version(
            out, digest("model", array_digest(trained.model.get_weights()), read_json(out / NORMALIZATION_FILE)),
            {f"patches/{s}": read_version(storage, "patches", s) for s in samples})
        pictures = {key: (out / file).read_bytes() for key, file in PICTURES.items() if (out / file).exists()}
        if history.get("loss"):  # larger type than the library's one-row history.png, for the metadata dialog
            from ..previews import training_curves

            pictures["curves"] = training_curves(history, title=f"training on {len(samples)} samples")
    # The registry alias follows the asset: moved only once the new model folder is in place.
    tracking.client().set_registered_model_alias(name, tracking.champion_alias, version)
    final = storage.url("model")
    training = trained.config.get("training", {})
    metadata: dict[str, Any] = {
        "mlflow_run": MetadataValue.url(tracking.run_url(run.info.run_id, run.info.experiment_id)),
        "mlflow_run_id": MetadataValue.text(run.info.run_id),
        "registered_model": MetadataValue.text(f"{name}/{version} (@{tracking.champion_alias})"),
        "model_version": MetadataValue.text(version),
        "model_name": MetadataValue.text(trained.config["model_name"]),
        "samples": MetadataValue.json(samples),
        "n_train": MetadataValue.int(int(trained.config["split"]["n_train"])),
        "n_val": MetadataValue.int(int(trained.config["split"]["n_val"])),
        "epochs_run": MetadataValue.int(n_epochs_run),
        "best_epoch": MetadataValue.int(int(training.get("best_epoch") or 0)),
        "path": MetadataValue.path(f"{final}/{MODEL_FILE}"),
        **timer.metadata(),
    }
    previous = tracking.client().search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"],
                                             max_results=2)
    if len(previous) == 2 and previous[0].info.run_id == run.info.run_id:
        metadata["mlflow_compare"] = MetadataValue.url(tracking.compare_url(
            [previous[1].info.run_id, run.info.run_id], run.info.experiment_id))
    for key in ("loss", "val_loss", "reconstruction_loss", "kl_loss"):
        if history.get(key):
            metadata[f"final_{key}"] = number(float(history[key][-1]))
    # the pictures first: they are what a person looks at on the model page
    metadata = {key: MetadataValue.md(png_markdown(png, PICTURE_TITLES[key])) for key, png in pictures.items()} \
        | metadata
    context.log.info(f"trained {trained.config['model_name']} on {len(samples)} samples; registered {name} v{version}")
    return MaterializeResult(data_version=data_version, metadata=metadata)


_MODEL_CACHE: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}


def load_current_model(storage: PhenocoderStorage) -> tuple[Any, dict[str, Any]]:
    """(:class:`~phenocoder_lib.training.TrainedModel`, model record) of the materialized ``model`` asset.

    Kept for the life of the process, keyed by the model record's modification time: the wells of a
    plate run load the model once, and a retrained model (a new record) is loaded again.
    """
    folder = storage.local_path("model")
    key = (str(folder), (folder / MODEL_INFO).stat().st_mtime_ns)
    if key not in _MODEL_CACHE:
        from phenocoder_lib.training import load_model  # imports TensorFlow

        info = read_json(folder / MODEL_INFO)
        trained = load_model(folder / MODEL_FILE)
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = (trained, info)
    return _MODEL_CACHE[key]


def read_well(storage: PhenocoderStorage, sample: str) -> tuple[Any, dict[str, Any]]:
    """The well's SpatialData and its keys (``table_key``, ``sample_key``, ``image_key``) from ``sdata``."""
    import spatialdata

    src = storage.local_path("sdata", sample)
    return spatialdata.read_zarr(src / SDATA_FILE), read_json(src / SUMMARY)


def latents_result(context: AssetExecutionContext, config: LatentsConfig, storage: PhenocoderStorage, sample: str,
                   encoded: Any, info: dict[str, Any], version: str, inputs: dict[str, str],
                   timer: Timer, keys: dict[str, Any]) -> MaterializeResult:
    """Write the well's latents (h5ad, summary, preview, version) and return the materialization."""
    from phenocoder_lib.io import write_json_atomic

    from ..previews import scatter, two_columns

    tag = model_tag(info)
    out = encoded.table
    out.uns["phenocoder_latents"] = {"model": tag, "sample_key": keys["sample_key"], "table_key": keys["table_key"],
                                     "run_id": context.run.run_id}
    png = None if encoded.pcs is None else scatter(two_columns(encoded.pcs), None, xlabel="PC1", ylabel="PC2",
                                                  title=f"{sample}: latents (PC1, PC2), model {tag}", size=5)
    with storage.stage("latents", sample) as folder:
        folder.mkdir()
        out.write_h5ad(folder / LATENTS_FILE)
        write_json_atomic(folder / SUMMARY, {"sample": sample, "model": tag, "n_objects": int(out.n_obs),
                                             "n_latent_dim": int(out.n_vars),
                                             "message_passing_radius": config.spatial_message_passing_radius})
        write_png(folder / PREVIEW_FILE, png)
        data_version = write_version(folder, version, inputs)
    per_sample = out.uns["phenocoder"]["samples"].get(sample, {})
    final = storage.url("latents", sample)
    return MaterializeResult(
        data_version=data_version,
        metadata={
            "n_objects": MetadataValue.int(int(out.n_obs)),
            "n_latent_dim": MetadataValue.int(int(out.n_vars)),
            "model": MetadataValue.text(tag),
            "model_version": MetadataValue.text(str(info.get("version", ""))),
            "mlflow_run_id": MetadataValue.text(str(info.get("run_id", ""))),
            "patch_source": MetadataValue.text(str(per_sample.get("patch_source", ""))),
            "anchor_source": MetadataValue.text(str(per_sample.get("anchor_source", ""))),
            "message_passing_radius": MetadataValue.text(str(config.spatial_message_passing_radius)),
            "path": MetadataValue.path(f"{final}/{LATENTS_FILE}"),
            **timer.metadata(),
            **preview_metadata(png, f"{sample}: latents", final),
        },
        check_results=[
            AssetCheckResult(check_name=CHECK_EVERY_OBJECT, passed=not encoded.missing,
                             metadata={"n_objects": encoded.n_expected, "n_latents": int(out.n_obs),
                                       "n_missing": len(encoded.missing)}),
            AssetCheckResult(check_name=CHECK_FINITE, passed=encoded.n_non_finite == 0,
                             metadata={"n_non_finite": encoded.n_non_finite}),
        ],
    )
