"""``Phenocoder`` methods for the model (steps 2-4 of the workflow guide).

``initialize_model`` -> ``train`` -> ``encode``, plus ``load_model`` and ``summarize_model``. Thin
wrappers over :mod:`phenocoder_lib.models`, :mod:`phenocoder_lib.training` and
:mod:`phenocoder_lib.encoding`; TensorFlow/Keras are imported inside the methods, so importing the
package stays cheap.

Files (``data_dir`` is the datasets' folder, ``model_name`` is derived from the parameters and the
seed, so the same call gives the same name)::

    <data_dir>/models/<model_name>/
        model_config.json      every parameter, the condition encoding (categories as JSON), the
                               training datasets' names and settings (geometry, normalization anchors)
        model.keras            the trained model (best epoch), loads with safe_mode=True
        checkpoint.keras       best-so-far model, written during training
        checkpoint.json        its epoch, val_loss, learning rate and SHA-1 (``train(resume=True)``)
        history.json/.csv      metrics per epoch
        history.png reconstructions.png latent_space.png   previews (train(plot=True))
    <data_dir>/tensorboard_logs/<model_name>/   TensorBoard event files
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .io import write_json_atomic
from .keys import DEFAULT_IMAGE_KEY, DEFAULT_SAMPLE_KEY, DEFAULT_TABLE_KEY, PHENOCODER_TABLE, SPATIAL_KEY
from .warnings import ModelSchemaWarning

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
MODEL_FILE = "model.keras"
CHECKPOINT_FILE = "checkpoint.keras"
CONFIG_FORMAT_VERSION = 1
_DEFAULT_MEMORY_BUDGET = 2**30  # = training.DEFAULT_MEMORY_BUDGET (training imports TensorFlow)


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument}={value!r} must be a positive int.")
    return int(value)


def _model_name(config: dict[str, Any]) -> str:
    """Deterministic name: the main parameters, the seed and a digest of everything else that shapes the run."""
    digest_keys = ("n_latent_dim", "n_dense_dim", "conditions", "conditions_encoder", "dropout", "batch_size",
                   "input_shape", "conv_layers", "beta", "flip", "shuffle", "validation_fraction", "split_by",
                   "seed", "datasets", "dataset_digest")
    blob = json.dumps({k: config.get(k) for k in digest_keys}, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
    prefix = "cond_" if config["conditions"] else ""
    return (f"{prefix}latent_{config['n_latent_dim']}_dense_{config['n_dense_dim']}_dropout_{config['dropout']}"
            f"_beta_{config['beta']}_seed_{config['seed']}_{digest}")


class ModelMixin:
    """``initialize_model``, ``load_model``, ``summarize_model``, ``train``, ``encode`` (see :class:`Phenocoder`)."""

    sdata: Any
    table_key: str
    sample_key: str
    image_key: str
    spatial_key: str
    seed: int
    data_dir: Path | None
    datasets: list[str]
    model: Any
    model_dir: Path | None
    model_config: dict[str, Any] | None
    model_name: str | None
    dir_tensorboard: Path | None
    history: dict[str, list[float]] | None

    # ------------------------------------------------------------------------------------------
    def initialize_model(
        self,
        n_latent_dim: int,
        n_dense_dim: int,
        conditions: Sequence[str] | None,
        dropout: float | None = 0.25,
        batch_size: int = 64,
        n_workers: int = 1,
        input_shape: Sequence[int] = (128, 128, 4),
        conv_layers: Sequence[int] = (8, 16, 32, 64, 128),
        beta: float = 0.01,
        flip: bool = False,
        shuffle: bool = True,
        *,
        validation_fraction: float = 0.2,
        split_by: Literal["object", "sample"] = "object",
        continuous_conditions: Sequence[str] | None = None,
        seed: int | None = None,
        memory_budget_bytes: int = _DEFAULT_MEMORY_BUDGET,
    ) -> Any:
        """Build the model and its training/validation batches from the patch datasets generated so far.

        A plain :class:`~phenocoder_lib.models.CVAE` when ``conditions`` is empty, else a
        :class:`~phenocoder_lib.models.CondCVAE`. Reads ``<data_dir>/<dataset>/`` of every name in
        ``datasets``; writes ``<data_dir>/models/<model_name>/model_config.json``.

        Parameters
        ----------
        n_latent_dim, n_dense_dim
            Latent size and width of the dense layer.
        conditions
            Condition columns: ``[]`` (or ``None``, as the earlier ``phenocoder`` library accepted) for a
            plain CVAE; any column of the patch index (``dataset``,
            ``sample``, ``z``, ``metadata_keys`` of the dataset) or of the table's ``.obs``. ``z`` and float
            columns are continuous (scaled to [0, 1] by the training range), others one-hot encoded.
        dropout, beta
            Dropout after the dense layers; weight of the KL term.
        batch_size
            Training batch size (also used for validation).
        n_workers
            Batch-preparation threads (the tf.data pipeline already prefetches one batch ahead).
        input_shape
            (height, width, channels); must equal the datasets' ``patch_size`` and channel count.
        conv_layers
            Filters of the stride-2 convolutions; height and width must be divisible by ``2**len(conv_layers)``.
        flip
            Dihedral augmentation (8 rotations/mirrors) of the training batches only.
        shuffle
            Seeded reshuffle of the training patches every epoch.
        validation_fraction
            Share of each sample's objects held out for validation (never an empty split).
        split_by
            ``"object"`` (within each sample, default) or ``"sample"`` (whole samples held out).
        continuous_conditions
            Which conditions are continuous (default: ``z`` and float columns).
        seed
            Seed of the split, order, augmentation, weights and sampling noise (default: ``self.seed``).
        memory_budget_bytes
            Raw patches up to this size (default 1 GiB) are held in RAM; larger datasets are streamed from
            the store through a chunk cache of at most this size, so training memory does not grow with the
            plate. The batches are the same either way (the budget is not part of the model name).

        Returns
        -------
        The Keras model (also ``self.model``).

        """
        from . import encoding as E
        from . import models as M
        from . import training as T

        if conditions is None:  # the earlier phenocoder library's spelling of "no conditions"
            conditions = []
        if isinstance(conditions, str):
            raise TypeError(f"conditions={conditions!r} must be a list of column names; pass [] for a plain CVAE.")
        conditions = [str(c) for c in conditions]
        if len(set(conditions)) != len(conditions):
            raise ValueError(f"conditions={conditions} names a column twice.")
        batch_size = _positive_int(batch_size, "batch_size")
        n_workers = _positive_int(n_workers, "n_workers")
        seed = self.seed if seed is None else int(seed)
        shape, convs = M.check_architecture(input_shape, conv_layers, n_latent_dim, n_dense_dim, dropout, beta)
        datasets = self.open_datasets()  # type: ignore[attr-defined]
        ref = T.check_datasets(datasets, shape)
        if not 0.0 < float(validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction={validation_fraction!r} must be strictly between 0 and 1.")
        if split_by not in ("object", "sample"):
            raise ValueError(f"split_by={split_by!r} is not valid; choose 'object' or 'sample'.")

        cond_enc = None
        if conditions:
            frame = E.condition_frame(conditions, index=T.training_index(datasets), sample_key=self.sample_key,
                                      obs=self._table_obs())
            cond_enc = E.ConditionEncoder.fit(frame, conditions, continuous=continuous_conditions)
        dataset_settings = {ds.name: ds.settings for ds in datasets}
        config: dict[str, Any] = {
            "format_version": CONFIG_FORMAT_VERSION,
            "model_class": "CondCVAE" if conditions else "CVAE",
            "conditional": bool(conditions),
            "n_latent_dim": int(n_latent_dim),
            "n_dense_dim": int(n_dense_dim),
            "conditions": conditions,
            "conditions_encoder": cond_enc.to_dict() if cond_enc is not None else None,
            "conditions_dim": cond_enc.width if cond_enc is not None else 0,
            "condition_features": cond_enc.feature_names if cond_enc is not None else [],
            "dropout": None if dropout is None else float(dropout),
            "batch_size": batch_size,
            "n_workers": n_workers,
            "input_shape": list(shape),
            "conv_layers": list(convs),
            "beta": float(beta),
            "flip": bool(flip),
            "shuffle": bool(shuffle),
            "validation_fraction": float(validation_fraction),
            "split_by": split_by,
            "seed": seed,
            "dir_dataset": str(Path(self.data_dir).resolve()),
            "datasets": [ds.name for ds in datasets],
            "dataset_settings": dataset_settings,
            "dataset_digest": hashlib.sha1(json.dumps(dataset_settings, sort_keys=True).encode()).hexdigest()[:12],
            "keys": {"table_key": self.table_key, "sample_key": self.sample_key, "image_key": self.image_key,
                     "spatial_key": self.spatial_key},
            "memory_budget_bytes": int(memory_budget_bytes),
        }
        config["model_name"] = _model_name(config)
        config["phenocoder_version"] = _version()

        import keras

        keras.utils.set_random_seed(seed)
        model = M.make_model(input_shape=shape, n_latent_dim=int(n_latent_dim), n_dense_dim=int(n_dense_dim),
                             conv_layers=convs, dropout=dropout, beta=float(beta),
                             n_conditions=cond_enc.width if cond_enc is not None else 0, seed=seed)
        self._make_generators(config, datasets)
        self.model = model
        self.model_oh_enc = cond_enc
        self.model_config = config
        self.model_name = config["model_name"]
        self.model_dir = Path(self.data_dir) / "models" / self.model_name
        self.dir_tensorboard = Path(self.data_dir) / "tensorboard_logs" / self.model_name
        self.history = None
        write_json_atomic(self.model_dir / MODEL_CONFIG_FILE, config)
        logger.info("initialized %s %s: %d training / %d validation patches, input %s, patch normalization %s",
                    config["model_class"], self.model_name, config["split"]["n_train"], config["split"]["n_val"],
                    shape,
                    {k: ref["normalization"][k] for k in ("scale", "scale_per_sample", "scale_percentile")})
        return model

    def _table_obs(self) -> Any:
        return self.sdata.tables[self.table_key].obs if self._has_table() else None

    def _make_generators(self, config: dict[str, Any], datasets: Sequence[Any]) -> None:
        """Training/validation batches as ``config`` prescribes (also after ``load_model``)."""
        from . import encoding as E
        from . import training as T

        index = T.training_index(datasets)
        cond_array = None
        if config["conditions"]:
            enc = E.ConditionEncoder.from_dict(config["conditions_encoder"])
            frame = E.condition_frame(config["conditions"], index=index, sample_key=config["keys"]["sample_key"],
                                      obs=self._table_obs())
            cond_array, _ = enc.transform(frame, warn=False)
        train_pos, val_pos = T.split_train_val(index, validation_fraction=config["validation_fraction"],
                                               seed=config["seed"], split_by=config["split_by"])
        data = T.load_patch_data(datasets, conditions=cond_array,
                                 memory_budget_bytes=config.get("memory_budget_bytes", _DEFAULT_MEMORY_BUDGET))
        self.data_generator_train = T.make_batches(data, train_pos, batch_size=config["batch_size"],
                                                   shuffle=config["shuffle"], flip=config["flip"],
                                                   seed=config["seed"], workers=config["n_workers"])
        self.data_generator_val = T.make_batches(data, val_pos, batch_size=config["batch_size"],
                                                 seed=config["seed"], workers=config["n_workers"])
        config["split"] = {"n_train": int(len(train_pos)), "n_val": int(len(val_pos)), "by": config["split_by"]}

    # ------------------------------------------------------------------------------------------
    def load_model(self, path: str | Path | None = None) -> Any:
        """Restore a model, its condition encoding and its dataset/normalization settings from disk.

        ``path`` is a model folder (``<data_dir>/models/<model_name>``), its ``model_config.json``, or a
        ``.keras`` file inside it (e.g. ``checkpoint.keras`` of an interrupted run); default
        ``self.model_dir``. Sets ``model``, ``model_config``, ``model_name``, ``model_dir``, ``data_dir``,
        ``datasets``, ``dir_tensorboard``, ``model_oh_enc`` and ``history``. Works in a fresh process:
        encoding needs only the SpatialData and this folder (the stored patches are used when present).
        """
        from . import encoding as E
        from . import models as M

        if path is None:
            if self.model_dir is None:
                raise ValueError("load_model(): no path given and no model_dir set; pass the model folder "
                                 "(<data_dir>/models/<model_name>).")
            path = self.model_dir
        path = Path(path)
        if path.is_dir():
            folder, keras_path = path, path / MODEL_FILE
        elif path.suffix == ".keras":
            folder, keras_path = path.parent, path
        elif path.name == MODEL_CONFIG_FILE:
            folder, keras_path = path.parent, path.parent / MODEL_FILE
        else:
            raise FileNotFoundError(f"load_model(path={str(path)!r}): not a model folder, model_config.json or "
                                    ".keras file.")
        config_path = folder / MODEL_CONFIG_FILE
        if not config_path.exists():
            raise FileNotFoundError(f"{str(config_path)!r} does not exist; pass a model folder written by "
                                    "initialize_model()/train().")
        if not keras_path.exists():
            hint = f" An interrupted run left {str(folder / CHECKPOINT_FILE)!r}; pass it as path." if (
                folder / CHECKPOINT_FILE).exists() else " Run train() first."
            raise FileNotFoundError(f"{str(keras_path)!r} does not exist.{hint}")
        config = read_model_config(config_path)
        import keras

        model = keras.saving.load_model(keras_path, safe_mode=True, compile=False)
        if not isinstance(model, M.CVAE):
            raise TypeError(f"{str(keras_path)!r} holds a {type(model).__name__}, not a Phenocoder CVAE.")
        self.model = model
        self.model_config = config
        self.model_name = config["model_name"]
        self.model_dir = folder
        self.data_dir = Path(config["dir_dataset"])
        self.datasets = list(config["datasets"])
        self.dir_tensorboard = self.data_dir / "tensorboard_logs" / self.model_name
        self.model_oh_enc = E.ConditionEncoder.from_dict(config["conditions_encoder"]) if config.get(
            "conditions_encoder") else None
        self.data_generator_train = None
        self.data_generator_val = None
        history = folder / "history.json"
        self.history = json.loads(history.read_text()) if history.exists() else None
        logger.info("loaded %s from %s", config["model_class"], keras_path)
        return model

    # ------------------------------------------------------------------------------------------
    def summarize_model(self) -> str:
        """Print (and return) the configuration and the encoder/decoder layer tables."""
        self._require_model()
        lines = [f"model: {type(self.model).__name__} {self.model_name}"]
        skip = {"dataset_settings", "conditions_encoder"}
        for key, value in (self.model_config or {}).items():
            if key not in skip:
                lines.append(f"  {key}: {value}")
        for part in (self.model.encoder, self.model.decoder):
            part.summary(print_fn=lambda s, line_break=True: lines.append(s))
        text = "\n".join(lines)
        print(text)
        return text

    # ------------------------------------------------------------------------------------------
    def train(
        self,
        n_epochs: int = 100,
        learning_rate: float = 1e-3,
        min_learning_rate: float = 1e-4,
        factor_learning_rate: float = 0.2,
        learning_rate_patience: int = 3,
        early_stopping_patience: int = 5,
        plot: bool = True,
        n_preview: int = 300,
        plot_frac: float = 0.001,
        *,
        verbose: int | str = "auto",
        on_epoch_end: Any = None,
        resume: bool = False,
    ) -> dict[str, list[float]]:
        """Fit the model; save it, its history and previews; return the metrics history.

        Adam with ``learning_rate``; ``ReduceLROnPlateau(val_loss, factor_learning_rate,
        learning_rate_patience, min_learning_rate)``; ``EarlyStopping(val_loss, early_stopping_patience,
        restore_best_weights=True)``. Writes ``checkpoint.keras`` whenever ``val_loss`` improves,
        ``history.json``/``history.csv`` every epoch, ``model.keras`` (best weights) at the end, TensorBoard
        logs under ``dir_tensorboard`` (replacing an earlier run of the same name) and, with ``plot``,
        ``reconstructions.png`` (``n_preview`` validation patches and their reconstructions from
        ``z_mean``), ``latent_space.png`` (``z_mean`` of a seeded ``plot_frac`` share of the training patches,
        at least one batch; UMAP, or PCA below 200 patches) and ``history.png``.
        ``on_epoch_end(epoch, metrics)``, if given, is called after every epoch (1-based) with that
        epoch's metrics (e.g. to log them to a tracking server while training runs).
        ``resume=True`` continues an interrupted training of this model (same parameters, so the same
        ``model_dir``, e.g. after ``initialize_model`` or ``load_model`` in a new process) from its best
        checkpoint: its weights (loaded with ``safe_mode=True``), its epoch and history, its learning rate;
        ``n_epochs`` counts all epochs, the interrupted ones included (see ``training.fit``).

        Returns
        -------
        dict of per-epoch lists: ``loss``, ``reconstruction_loss``, ``kl_loss``, ``val_loss``,
        ``val_reconstruction_loss``, ``val_kl_loss``, ``learning_rate``, ``epoch``, ``epoch_seconds``,
        ``train_seconds``, ``train_patches_per_s``.

        """
        from . import training as T

        self._require_model()
        if getattr(self, "data_generator_train", None) is None:
            # After load_model: rebuild the same split and batches from the datasets on disk.
            self._make_generators(self.model_config, self.open_datasets())  # type: ignore[attr-defined]
        if not 0 < float(plot_frac) <= 1:
            raise ValueError(f"plot_frac={plot_frac!r} must be in (0, 1].")
        n_preview = _positive_int(n_preview, "n_preview")
        resume_from = None
        if resume:
            import keras

            resume_from = T.checkpoint_state(self.model_dir, CHECKPOINT_FILE)
            saved = keras.saving.load_model(resume_from["path"], safe_mode=True, compile=False)
            self.model.set_weights(saved.get_weights())
            logger.info("resuming %s from epoch %d (val_loss %.4g)", self.model_name, resume_from["epoch"],
                        resume_from["val_loss"])
        elif self.dir_tensorboard is not None and Path(self.dir_tensorboard).exists():
            shutil.rmtree(self.dir_tensorboard)
        config = self.model_config
        result = T.fit(
            self.model, self.data_generator_train, self.data_generator_val,
            model_dir=self.model_dir, log_dir=self.dir_tensorboard, n_epochs=n_epochs,
            learning_rate=learning_rate, min_learning_rate=min_learning_rate,
            factor_learning_rate=factor_learning_rate, learning_rate_patience=learning_rate_patience,
            early_stopping_patience=early_stopping_patience, seed=config["seed"], verbose=verbose,
            on_epoch_end=on_epoch_end, resume_from=resume_from,
        )
        T.save_model_atomic(self.model, Path(self.model_dir) / MODEL_FILE)
        history = result["history"]
        config["training"] = {
            "n_epochs": int(n_epochs), "learning_rate": float(learning_rate),
            "min_learning_rate": float(min_learning_rate), "factor_learning_rate": float(factor_learning_rate),
            "learning_rate_patience": int(learning_rate_patience),
            "early_stopping_patience": int(early_stopping_patience),
            "epochs_run": len(history.get("loss", [])), "best_epoch": result["best_epoch"],
            "seconds": round(result["seconds"], 3),
        }
        write_json_atomic(Path(self.model_dir) / MODEL_CONFIG_FILE, config)
        self.history = history
        if plot:
            self._plot_previews(n_preview=n_preview, plot_frac=float(plot_frac))
        return history

    def _plot_previews(self, *, n_preview: int, plot_frac: float) -> None:
        from . import plotting
        from . import training as T

        train, val = self.data_generator_train, self.data_generator_val
        data = train.data
        seed = self.model_config["seed"]
        folder = Path(self.model_dir)
        plotting.plot_history(self.history, folder / "history.png")
        rng = np.random.default_rng([seed, 11])
        n_show = min(n_preview, len(val.positions))
        show = np.sort(rng.choice(val.positions, size=n_show, replace=False))
        inputs, recon = T.reconstruct(self.model, data, show)
        plotting.plot_reconstructions(inputs, recon, folder / "reconstructions.png",
                                      channels=self.model_config["dataset_settings"][self.datasets[0]]["channels"],
                                      title="validation patches: input | reconstruction from z_mean")
        n_latent = min(len(train.positions), max(int(np.ceil(plot_frac * len(train.positions))), train.batch_size))
        pick = np.sort(rng.choice(train.positions, size=n_latent, replace=False))
        z = T.predict_z_mean(self.model, data, pick)
        coords, method = plotting.embed_2d(z, seed=seed)
        colors: dict[str, Any] = {"sample": data.index["sample"].to_numpy()[pick]}
        if self.model_oh_enc is not None:
            from .encoding import condition_frame

            frame = condition_frame(self.model_config["conditions"], index=data.index.iloc[pick],
                                    sample_key=self.sample_key,
                                    obs=self.sdata.tables[self.table_key].obs if self._has_table() else None)
            for col in self.model_config["conditions"]:
                colors[col] = frame[col].to_numpy()
        plotting.plot_latent_space(coords, colors, folder / "latent_space.png", method=method)
        self._log_images_to_tensorboard(folder)

    def _log_images_to_tensorboard(self, folder: Path) -> None:
        if self.dir_tensorboard is None:
            return
        try:
            import tensorflow as tf
            from matplotlib.image import imread
        except ImportError:  # pragma: no cover
            return
        writer = tf.summary.create_file_writer(str(Path(self.dir_tensorboard) / "previews"))
        with writer.as_default():
            for name in ("reconstructions", "latent_space"):
                png = folder / f"{name}.png"
                if png.exists():
                    img = imread(png)[..., :3]
                    tf.summary.image(name, img[None], step=0)
        writer.close()

    # ------------------------------------------------------------------------------------------
    def encode(
        self,
        batch_size: int = 512,
        scale: bool | None = None,
        spatial_key_index: str | None = None,
        scale_percentile: float | None = None,
        scale_per_sample: bool | None = None,
        spatial_message_passing_radius: float | None = None,
        *,
        samples: Sequence[str] | None = None,
        table_name: str = PHENOCODER_TABLE,
        use_store: bool = True,
        progress: bool = True,
    ) -> Any:
        """Encode every object of ``sdata.tables[table_key]`` and store ``sdata.tables[table_name]``.

        Latents are ``z_mean`` (deterministic); the table has one row per object (border objects are
        padded, never dropped), see :func:`phenocoder_lib.encoding.encode_table` for its contents. The
        normalization and patch geometry are those of the training datasets (recorded in
        ``model_config``); samples that were not in training are cut from the images and normalized the
        same way (per-sample anchors from their own patches).

        Parameters
        ----------
        batch_size
            Patches per forward pass (bounds memory). The default is 512, not the earlier library's 64:
            on a CPU the per-call overhead halves the throughput at 64, and ``z_mean`` does not depend on it.
        scale, scale_percentile, scale_per_sample, spatial_key_index
            Optional checks: when given they must equal the datasets' stored values, else a
            ``ValueError`` says what was stored. ``None`` uses the stored values.
        spatial_message_passing_radius
            When given, ``.layers['spatial_message_passing']`` holds the mean latent of each object and
            its neighbours within this radius (inclusive, units of ``.obsm[spatial_key]``), per sample.
        samples
            Encode only these samples (default: all).
        table_name
            Name of the written table (default ``'phenocoder'``; an existing table of that name is replaced).
        use_store
            Read stored patches when the dataset holds the sample (False: always cut from the images).
        progress
            Show a progress bar over the samples.

        Returns
        -------
        The encoded AnnData (also ``sdata.tables[table_name]``).

        """
        from . import encoding as E

        self._require_model()
        sdata = self._require_sdata()  # type: ignore[attr-defined]
        config = self.model_config
        first = config["dataset_settings"][config["datasets"][0]]
        norm = first["normalization"]
        for argument, given, stored in (("scale", scale, norm["scale"]),
                                        ("scale_per_sample", scale_per_sample, norm["scale_per_sample"]),
                                        ("scale_percentile", scale_percentile, norm["scale_percentile"]),
                                        ("spatial_key_index", spatial_key_index, first["spatial_key_index"])):
            if given is None:
                continue
            same = (float(given) == float(stored)) if argument == "scale_percentile" else (given == stored)
            if not same:
                raise ValueError(
                    f"encode({argument}={given!r}) disagrees with the training datasets, which were made with "
                    f"{argument}={stored!r} (dataset {config['datasets'][0]!r}); encoding must crop and normalize "
                    f"as in training. Pass {argument}={stored!r} or leave it out."
                )
        batch_size = _positive_int(batch_size, "batch_size")
        table = E.encode_table(
            self.model, sdata, model_config=config, table_key=self.table_key, sample_key=self.sample_key,
            image_key=self.image_key, spatial_key=self.spatial_key, batch_size=batch_size,
            spatial_message_passing_radius=spatial_message_passing_radius, data_dir=self.data_dir,
            samples=samples, use_store=use_store, progress=progress,
        )
        if table_name in sdata.tables:
            logger.info("replacing table %r", table_name)
            del sdata.tables[table_name]
        sdata.tables[table_name] = table
        return table

    # ------------------------------------------------------------------------------------------
    def _require_model(self) -> None:
        if self.model is None or self.model_config is None:
            raise ValueError("No model: call initialize_model(...) (and train()) or load_model(path) first.")

    def _has_table(self) -> bool:
        return self.sdata is not None and self.table_key in self.sdata.tables


#: Keys of ``model_config.json`` that loading and encoding need; an older file lacking one cannot be migrated.
REQUIRED_CONFIG_KEYS = ("model_name", "model_class", "input_shape", "conditions", "datasets", "dir_dataset",
                        "dataset_settings")
#: Keys added after the first schema, with the value that reproduces the older behaviour.
_CONFIG_DEFAULTS: dict[str, Any] = {"conditions_encoder": None, "batch_size": 64, "seed": 0, "shuffle": True,
                                    "validation_fraction": 0.2, "split_by": "object",
                                    "memory_budget_bytes": _DEFAULT_MEMORY_BUDGET}


def read_model_config(config_path: str | Path) -> dict[str, Any]:
    """Read ``model_config.json``; migrate an older schema (with a :class:`ModelSchemaWarning`) or raise.

    A file without ``format_version`` is schema 0. Older files that hold every key of
    :data:`REQUIRED_CONFIG_KEYS` are migrated in memory (missing optional keys get the values that
    reproduce the older behaviour); otherwise a ``ValueError`` names the file, the version found and
    the missing keys. A newer schema than this Phenocoder understands also raises.
    """
    import warnings

    config_path = Path(config_path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({err}); the model folder is damaged: "
                         "retrain the model or restore the folder from a backup.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} holds a {type(config).__name__}, not a model configuration; "
                         "pass a model folder written by initialize_model()/train().")
    found = config.get("format_version", 0)
    if not isinstance(found, int) or found > CONFIG_FORMAT_VERSION:
        raise ValueError(f"{str(config_path)!r} has format_version={found!r}; this Phenocoder reads versions up to "
                         f"{CONFIG_FORMAT_VERSION}. Upgrade phenocoder to load this model.")
    if found < CONFIG_FORMAT_VERSION:
        missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(
                f"{str(config_path)!r} has format_version={found!r} (older than {CONFIG_FORMAT_VERSION}) and lacks "
                f"{missing}, so it cannot be migrated. Retrain the model (initialize_model() and train(), or "
                "materialize the 'model' asset) to write the current schema.")
        added = [k for k in _CONFIG_DEFAULTS if k not in config]
        for key in added:
            config[key] = _CONFIG_DEFAULTS[key]
        config.setdefault("keys", {"table_key": DEFAULT_TABLE_KEY, "sample_key": DEFAULT_SAMPLE_KEY,
                                   "image_key": DEFAULT_IMAGE_KEY, "spatial_key": SPATIAL_KEY})
        config["migrated_from_format_version"] = found
        config["format_version"] = CONFIG_FORMAT_VERSION
        warnings.warn(f"{str(config_path)!r} has format_version={found!r}; migrated to {CONFIG_FORMAT_VERSION} in "
                      f"memory (defaults for {added}). Retrain or re-save the model to silence this warning.",
                      ModelSchemaWarning, stacklevel=3)
    return config


def _version() -> str:
    from . import __version__

    return __version__
