"""``well_profiles`` (all samples): per-well profiles and, when a plate layout is present, their retrieval mAP."""

from pathlib import Path

from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ._common import LATENTS_FILE, STATS_FILE, Timer, logical_version, number, read_version, settings_of, write_version

CHECK_COMPLETE = "well_profiles_complete"
EVALUATION_FILE = "evaluation.json"
#: Raw (aggregated, not yet normalized) profiles written per representation.
RAW_REPRESENTATIONS = ("latents", "latents_message_passing", "graph_stats")
CODE_VERSION = "1"


class ProfilesConfig(Config):
    """Settings of :func:`phenocoder_lib.profiles.build_profiles` and ``evaluation.evaluate_profiles``."""

    corr_threshold: float = Field(default=0.9, gt=0, le=1,
                                  description="Drop one of two features correlated above this.")
    sphere: bool = Field(default=False, description="ZCA sphering on the control wells after feature selection.")
    null_size: int = Field(default=10000, ge=1, description="Permutations of the mAP p-values.")
    seed: int = Field(default=0, description="Seed of the permutation nulls.")


@asset(
    deps=[AssetDep("latents", partition_mapping=AllPartitionMapping()),
          AssetDep("graph_stats", partition_mapping=AllPartitionMapping())],
    group_name="cross_sample",
    kinds={"pandas", "copairs"},
    code_version=CODE_VERSION,
    check_specs=[AssetCheckSpec(CHECK_COMPLETE, asset="well_profiles",
                                description="Every sample with latents has a finite latent profile.")],
    description=describe("well_profiles", "Per-well profiles (median latent, median message-passed latent, graph "
                         "statistics) of every sample, `<root>/well_profiles/_/<representation>.parquet`. When a "
                         "`layout.csv` (well, treatment, dose, control, mechanism) sits beside a plate export, the "
                         "profiles are normalized per plate against its controls and scored (retrieval mAP, "
                         "copairs): metadata `profiling/<representation>/<metric>`. Without a layout nothing is "
                         "claimed."),
)
def well_profiles(context: AssetExecutionContext, config: ProfilesConfig,
                  storage: PhenocoderStorage) -> MaterializeResult:
    """:func:`phenocoder_lib.profiles.aggregate_table` of every sample's latents, plus its graph statistics."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.keys import MESSAGE_PASSING_LAYER
    from phenocoder_lib.profiles import LAYOUT_FILE, aggregate_table

    from ..state import SUMMARY, read_json

    samples = storage.partitions("latents")
    if len(samples) < 2:
        raise ValueError(f"well profiles need the latents of at least 2 samples, found {samples}; materialize "
                         "'latents' for more samples first.")
    # computed from every sample's latents and graph statistics (and the layouts, digested below)
    inputs = {f"latents/{s}": read_version(storage, "latents", s) for s in samples}
    inputs |= {f"graph_stats/{s}": read_version(storage, "graph_stats", s) for s in storage.partitions("graph_stats")}
    timer = Timer()
    raw: dict[str, list] = {name: [] for name in RAW_REPRESENTATIONS}
    with timer.phase("aggregate"):
        for s in samples:
            table = ad.read_h5ad(storage.local_path("latents", s) / LATENTS_FILE)
            key = table.uns.get("phenocoder_latents", {}).get("sample_key", "sample")
            raw["latents"].append(aggregate_table(table, sample_key=key, prefix="latent:"))
            if MESSAGE_PASSING_LAYER in table.layers:
                raw["latents_message_passing"].append(aggregate_table(table, layer=MESSAGE_PASSING_LAYER,
                                                                      sample_key=key, prefix="mp:"))
        for s in storage.partitions("graph_stats"):
            stats = ad.read_h5ad(storage.local_path("graph_stats", s) / STATS_FILE)
            ok = (stats.obs["status"].astype(str) == "ok").to_numpy() if "status" in stats.obs else None
            stats = stats[ok] if ok is not None else stats
            if stats.n_obs:
                x = np.asarray(stats.X, dtype=np.float64)
                raw["graph_stats"].append(pd.DataFrame(np.nanmedian(x, axis=0)[None],
                                                       index=pd.Index([s], name="sample"),
                                                       columns=[str(v) for v in stats.var_names]))
    frames = {k: pd.concat(v) for k, v in raw.items() if v}
    sample_info = []
    for s in samples:
        info = read_json(storage.local_path("sdata", s) / SUMMARY) if storage.exists("sdata", s) else {}
        sample_info.append({"sample": s, "plate": str(info.get("plate", "")), "well": str(info.get("well", "")),
                            "plate_dir": str(info.get("plate_dir", ""))})
    sample_info = pd.DataFrame(sample_info)
    with timer.phase("score"):
        scores = _score(context, frames, sample_info, config)
    with storage.stage("well_profiles") as out:
        out.mkdir()
        for name, frame in frames.items():
            frame.to_parquet(out / f"{name}.parquet")
        sample_info.to_parquet(out / "samples.parquet")
        if scores is not None:
            write_json_atomic(out / EVALUATION_FILE, scores)
        layouts = {plate_dir: _file_digest(Path(plate_dir) / LAYOUT_FILE)
                   for plate_dir in sorted(set(sample_info["plate_dir"])) if plate_dir}
        data_version = write_version(out, logical_version(CODE_VERSION, settings_of(config), {**inputs, **layouts}),
                                     inputs)
    lat = frames["latents"].drop(columns="n_objects")
    missing = sorted(set(samples) - set(lat.index))
    finite = bool(np.isfinite(lat.to_numpy(np.float64)).all())
    metadata = {
        "n_samples": MetadataValue.int(len(samples)),
        "representations": MetadataValue.json({k: int(v.shape[1]) for k, v in frames.items()}),
        "scored": MetadataValue.bool(scores is not None),
        "path": MetadataValue.path(storage.url("well_profiles")),
        **timer.metadata(),
    }
    if scores is not None:
        metadata["profiling/n_wells_with_layout"] = MetadataValue.int(int(scores["n_wells_with_layout"]))
        for rep, values in scores["representations"].items():
            for metric in ("map_activity", "map_consistency", "fraction_retrieved_activity", "percent_replicating"):
                v = values.get(metric)
                if v is not None and np.isfinite(v):
                    metadata[f"profiling/{rep}/{metric}"] = number(float(v))
    return MaterializeResult(data_version=data_version, metadata=metadata, check_results=[AssetCheckResult(
        check_name=CHECK_COMPLETE, passed=not missing and finite,
        metadata={"n_missing": len(missing), "all_finite": finite})])


def _file_digest(path: Path) -> str:
    """SHA-256 of a small file's bytes, or ``"absent"``: a new or edited layout changes what is scored."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:24] if path.is_file() else "absent"


def _score(context: AssetExecutionContext, frames: dict, sample_info, config: ProfilesConfig) -> dict | None:
    """Normalize and score the profiles of the samples whose plate folder holds a ``layout.csv``; else ``None``.

    A failure here is logged, never raised: the profiles themselves are the asset, their scores an extra.
    """
    from pathlib import Path

    import pandas as pd

    from phenocoder_lib.profiles import LAYOUT_FILE, attach_layout, build_profiles, combine_profiles, read_layout
    from phenocoder_lib.retrieval import evaluate_profiles
    from phenocoder_lib.screen_evaluation import GRAPH_STAT_GROUPS

    layouts = []
    for plate, plate_dir in sample_info[["plate", "plate_dir"]].drop_duplicates().itertuples(index=False):
        if plate_dir and (Path(plate_dir) / LAYOUT_FILE).is_file():
            layouts.append(read_layout(Path(plate_dir) / LAYOUT_FILE).assign(plate=plate))
    if not layouts:
        context.log.info("no layout.csv beside the plate exports: the profiles are not scored")
        return None
    try:
        layout = pd.concat(layouts, ignore_index=True)
        kinds = layout.pop("kind") if "kind" in layout.columns else None
        profiles = {}
        for name, frame in frames.items():
            feats = frame.drop(columns="n_objects", errors="ignore")
            if name == "graph_stats":  # the statistics of who sits next to whom, as `validate --json` scores them
                feats = feats[[c for c in feats.columns if any(f"_stat:{g}_" in c for g in GRAPH_STAT_GROUPS)]]
            with_layout = attach_layout(feats, sample_info, layout)
            profiles[name] = build_profiles(with_layout, list(feats.columns), representation=name,
                                            corr_threshold=config.corr_threshold, sphere=config.sphere)
        if "latents" in profiles and "graph_stats" in profiles:
            profiles["combined"] = combine_profiles({"latents": profiles["latents"],
                                                     "graph_stats": profiles["graph_stats"]})
        subsets = None
        if kinds is not None:
            treated = layout.assign(kind=kinds)[~layout["control"]]
            subsets = {str(k): sorted(treated.loc[treated["kind"] == k, "treatment"].unique())
                       for k in treated["kind"].unique()}
        scores = {name: evaluate_profiles(p, null_size=config.null_size, seed=config.seed, subsets=subsets)
                  for name, p in profiles.items()}
    except Exception as err:  # auxiliary: never fail the profiles over their scores
        context.log.warning(f"profile scoring skipped: {type(err).__name__}: {err}")
        return None
    summary = {k: round(v["map_activity"], 3) for k, v in scores.items()}
    context.log.info(f"profiles scored against the layout (map_activity): {summary}")
    from phenocoder_lib.evaluation import json_safe

    return json_safe({"n_wells_with_layout": int(profiles["latents"].n_wells), "representations": scores})
