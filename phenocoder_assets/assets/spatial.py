"""``graph_stats`` (per sample) and ``embedding`` (all samples): steps 5 and 6 of the workflow guide."""

from pathlib import Path

from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ..configs import EmbeddingConfig, GraphStatsConfig
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import (
    EMBEDDING_FILE,
    LABELS_FILE,
    LATENTS_FILE,
    PREVIEW_FILE,
    STATS_FILE,
    Timer,
    logical_version,
    number,
    preview_metadata,
    read_version,
    settings_of,
    write_png,
    write_version,
)

CHECK_COMPLETE = "graph_stats_complete"
GRAPH_STATS_CODE_VERSION = "1"
EMBEDDING_CODE_VERSION = "1"
#: Settings that do not change the statistics (left out of the data version): parallelism.
GRAPH_STATS_COSMETIC = ("n_jobs",)


@per_sample_asset(
    deps=["latents", "clusters"],
    kinds={"anndata", "numba"},
    code_version=GRAPH_STATS_CODE_VERSION,
    check_specs=(AssetCheckSpec(CHECK_COMPLETE, asset="graph_stats",
                                description="Every row computed (status 'ok') with every expected feature column."),),
    description=describe("graph_stats", "Spatial graph statistics of a well: one row of "
                         "`radius:{r}_stat:{group}_{column}` features (or one per subunit), "
                         "`<root>/graph_stats/<sample>/stats.h5ad`."),
)
def graph_stats(context: AssetExecutionContext, config: GraphStatsConfig, storage: PhenocoderStorage):
    """:func:`phenocoder_lib.spatial.compute_spatial_stats` on the well's latents table and cluster labels."""
    yield from for_each_well(context, lambda sample: _graph_stats_one(context, config, storage, sample),
                             upstream=('latents', 'clusters'))


def _graph_stats_one(context: AssetExecutionContext, config: GraphStatsConfig, storage: PhenocoderStorage,
                     sample: str) -> MaterializeResult:
    """One well of ``graph_stats``."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.spatial import compute_spatial_stats
    from phenocoder_lib.spatial.stats import feature_names, normalize_radii, normalize_stats

    from ..state import SUMMARY

    inputs = {"latents": read_version(storage, "latents", sample),
              "clusters": read_version(storage, "clusters", sample),
              "cluster_reference": read_version(storage, "cluster_reference")}
    version = logical_version(GRAPH_STATS_CODE_VERSION, settings_of(config, GRAPH_STATS_COSMETIC), inputs)
    table = ad.read_h5ad(storage.local_path("latents", sample) / LATENTS_FILE)
    info = table.uns["phenocoder_latents"]
    sample_key = info["sample_key"]
    labels = pd.read_parquet(storage.local_path("clusters", sample) / LABELS_FILE)
    cluster_key = [c for c in labels.columns if c != "obs_name" and not c.endswith("_confidence")][0]
    ref_info = _reference_info(storage)
    labels = labels.set_index("obs_name")[cluster_key].astype(str).reindex(table.obs_names.astype(str))
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} objects of {sample!r} have no cluster label; rematerialize "
                         f"'clusters' for {sample!r} (its labels are older than its latents).")
    table.obs[cluster_key] = pd.Categorical(labels.to_numpy(), categories=ref_info["categories"])
    timer = Timer()
    with timer.phase("compute"):
        result = compute_spatial_stats(
            table, sample_key=sample_key, cluster_key=cluster_key, spatial_key=config.spatial_key,
            radii=config.radii, stats=None if config.stats is None else [str(s) for s in config.stats],
            layer=config.layer, chull_min_nds=config.chull_min_nds,
            chull_min_degree=config.chull_min_degree, exact=config.exact,
            n_clustering_samples=config.n_clustering_samples, use_subunits=config.use_subunits,
            dim_subunit=config.dim_subunit, min_obs_per_subunit=config.min_obs_per_subunit,
            max_obs_per_subunit=config.max_obs_per_subunit, subunit_origin=config.subunit_origin,
            seed=config.seed, n_jobs=config.n_jobs, progress=False, table_key="phenocoder",
            max_clusters=config.max_clusters,
        )
    for col in ("plate", "well"):  # per-sample constants, for the embedding's obs_keys/batch_key
        if col in table.obs.columns:
            result.obs[col] = str(table.obs[col].astype(str).iloc[0])
    provenance = {"model": info["model"], "reference_id": ref_info["id"]}
    result.uns["phenocoder_graph_stats"] = provenance
    png = _interaction_heatmap(result, ref_info["categories"], config.radii, sample)
    with storage.stage("graph_stats", sample) as out:
        out.mkdir()
        result.write_h5ad(out / STATS_FILE)
        write_json_atomic(out / SUMMARY, {"sample": sample, **provenance, "n_rows": int(result.n_obs)})
        data_version = write_version(out, version, inputs)
        write_png(out / PREVIEW_FILE, png)

    stats_t = normalize_stats(config.stats)
    var_names = [str(v) for v in table.var_names] if "moran_features" in stats_t else []
    expected = feature_names(normalize_radii(config.radii), stats_t, ref_info["categories"], var_names)
    missing_cols = sorted(set(expected) - set(result.var_names))
    status = result.obs["status"].astype(str)
    counts = result[:, [c for c in result.var_names if "_stat:counts_" in c]].X
    complete = not missing_cols and bool((status == "ok").all()) and bool(np.isfinite(counts).all())
    n_nan = int(np.isnan(result.X).sum())
    final = storage.url("graph_stats", sample)
    return MaterializeResult(
        data_version=data_version,
        metadata={
            **preview_metadata(png, f"{sample}: neighbourhood enrichment", final),
            "n_rows": MetadataValue.int(int(result.n_obs)),
            "n_features": MetadataValue.int(int(result.n_vars)),
            "n_skipped": MetadataValue.int(int((status != "ok").sum())),
            "n_nan_values": MetadataValue.int(n_nan),
            "path": MetadataValue.path(f"{final}/{STATS_FILE}"),
            **timer.metadata(),
        },
        check_results=[AssetCheckResult(
            check_name=CHECK_COMPLETE, passed=complete,
            metadata={"n_expected_features": len(expected), "n_missing_features": len(missing_cols),
                      "skipped_reasons": MetadataValue.text("; ".join(result.obs["skipped_reason"].astype(str)
                                                                      [status != "ok"].tolist()[:5])),
                      "n_nan_values": n_nan},
        )],
    )


def _interaction_heatmap(result, categories: list, radii: list[float], sample: str) -> bytes | None:
    """Cluster x cluster neighbourhood-enrichment z-scores at the smallest radius (mean over rows), or None."""
    import numpy as np

    from phenocoder_lib.spatial.stats import format_radius

    from ..previews import heatmap

    cats = [str(c) for c in categories]
    radius = format_radius(min(radii))
    columns = [f"radius:{radius}_stat:interactions_enrichment_zscore_{a}_{b}" for a in cats for b in cats]
    if not cats or not set(columns) <= set(result.var_names):
        return None  # the interactions group was not computed
    values = np.asarray(result[:, columns].X, dtype=float)
    if values.shape[0] == 0:
        return None
    with np.errstate(all="ignore"):  # an absent cluster pair is NaN in every row: shown grey
        matrix = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=0) if values.shape[0] > 1 \
            else values[0]
    return heatmap(matrix.reshape(len(cats), len(cats)), cats, colorbar="enrichment z-score",
                   title=f"{sample}: neighbours within {radius} um", xlabel="neighbour cluster",
                   ylabel="cluster")


def _reference_info(storage: PhenocoderStorage) -> dict:
    from ..state import REFERENCE_INFO, read_json

    return read_json(storage.local_path("cluster_reference") / REFERENCE_INFO)


@asset(
    # latents as well: Dagster marks an asset STALE only when a direct dependency changed, and the
    # embedding must say so as soon as the latents its statistics were computed from are replaced
    deps=[AssetDep("graph_stats", partition_mapping=AllPartitionMapping()),
          AssetDep("latents", partition_mapping=AllPartitionMapping())],
    group_name="cross_sample",
    kinds={"scanpy", "umap"},
    code_version=EMBEDDING_CODE_VERSION,
    description=describe("embedding", "Embedding of every sample's spatial statistics: scaled, optionally "
                         "batch-corrected, PCA, neighbours, UMAP (`<root>/embedding/_/embedding.h5ad`). "
                         "Refreshed nightly."),
)
def embedding(context: AssetExecutionContext, config: EmbeddingConfig, storage: PhenocoderStorage) -> MaterializeResult:
    """:func:`phenocoder_lib.embedding.spatialgraph_embedding` over the graph_stats of all samples (read by path)."""
    import warnings

    import anndata as ad
    import numpy as np

    from phenocoder_lib.embedding import spatialgraph_embedding

    from ..previews import scatter, two_columns

    samples = storage.partitions("graph_stats")
    if len(samples) < 2:
        raise ValueError(f"the embedding needs the graph_stats of at least 2 samples, found {samples}; materialize "
                         "'graph_stats' for more samples first.")
    known = set(context.instance.get_dynamic_partitions("samples"))
    inputs = {f"graph_stats/{s}": read_version(storage, "graph_stats", s) for s in samples}
    version = logical_version(EMBEDDING_CODE_VERSION, settings_of(config), inputs)
    timer = Timer()
    with timer.phase("read"):
        parts = [ad.read_h5ad(storage.local_path("graph_stats", s) / STATS_FILE) for s in samples]
    refs = sorted({p.uns.get("phenocoder_graph_stats", {}).get("reference_id", "") for p in parts})
    if len(refs) > 1:
        context.log.warning(f"graph_stats were computed with different cluster references {refs}; their columns "
                            "may not be comparable. Rematerialize 'clusters' and 'graph_stats' for all samples.")
    stats = ad.concat(parts, join="outer", merge="first", uns_merge="first")
    stats.uns["spatialgraph_stats"] = dict(parts[0].uns["spatialgraph_stats"])
    variable = config.n_variable_features if config.n_variable_features is not None else config.variable_features
    obs_keys = [k for k in config.obs_keys if k in stats.obs.columns]
    with timer.phase("embed"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = spatialgraph_embedding(
            stats, config.n_dim, scale=config.scale, variable_features=variable,
            batch_correction=config.batch_correction, batch_key=config.batch_key,
            confounder_key=config.confounder_key or None, n_neighbors=config.n_neighbors, umap=config.umap,
            obs_keys=obs_keys or None, seed=config.seed,
        )
    for w in caught:
        context.log.warning(f"embedding: {w.message}")
    key = "X_umap" if config.umap else "X_pca"
    xy = two_columns(np.asarray(emb.obsm[key]))
    color, legend = _well_colours(storage, [str(s) for s in emb.obs_names], emb.obs)
    png = scatter(xy, color, title=f"{emb.n_obs} wells ({key[2:].upper()}), coloured by {legend}",
                  xlabel=f"{key[2:].upper()}1", ylabel=f"{key[2:].upper()}2", size=30,
                  annotate=[str(s) for s in emb.obs_names])
    with storage.stage("embedding") as out:
        out.mkdir()
        emb.write_h5ad(out / EMBEDDING_FILE)
        write_png(out / PREVIEW_FILE, png)
        data_version = write_version(out, version, inputs)
    with timer.phase("planted_truth"):
        truth = _planted_truth_metadata(context, storage, samples, emb)
    final = storage.url("embedding")
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, "well embedding", final),
        **truth,
        "n_samples": MetadataValue.int(int(emb.n_obs)),
        "n_features": MetadataValue.int(int(emb.n_vars)),
        "n_components": MetadataValue.int(int(emb.obsm["X_pca"].shape[1])),
        "samples": MetadataValue.json(samples),
        "partitions_without_graph_stats": MetadataValue.json(sorted(known - set(samples))),
        "path": MetadataValue.path(f"{final}/{EMBEDDING_FILE}"),
        **timer.metadata(),
    })


def _well_colours(storage: PhenocoderStorage, samples: list[str], obs) -> tuple[list[str] | None, str]:
    """Colour of each well in the embedding picture: its treatment when known, else its plate.

    Treatments come from an ``obs`` column ``treatment`` or from the plate export's
    ``ground_truth/wells.csv`` (synthetic plates); the plate from ``obs['plate']``.
    """
    import pandas as pd

    from ..state import SUMMARY, read_json

    if "treatment" in obs.columns:
        return obs["treatment"].astype(str).tolist(), "treatment"
    treatments: dict[str, str] = {}
    try:
        for s in samples:
            info = read_json(storage.local_path("sdata", s) / SUMMARY)
            table = Path(info.get("plate_dir", "")) / "ground_truth" / "wells.csv"
            if table.is_file():
                wells = pd.read_csv(table, dtype=str).set_index("well")["treatment"]
                if str(info.get("well")) in wells.index:
                    treatments[s] = str(wells[str(info["well"])])
    except (OSError, KeyError, ValueError):
        treatments = {}
    if treatments and len(treatments) == len(samples):
        return [treatments[s] for s in samples], "treatment"
    if "plate" in obs.columns:
        return obs["plate"].astype(str).tolist(), "plate"
    return None, "well"


def _planted_truth_metadata(context: AssetExecutionContext, storage: PhenocoderStorage, samples: list[str],
                            emb) -> dict:
    """``planted_truth/*`` metadata when the samples' plate folders hold ground truth (synthetic plates), else {}.

    The plate folder and well of each sample come from its ``sdata`` summary; cell types are scored
    against the ``clusters`` labels, treatments against the embedding's ``X_pca``
    (:func:`phenocoder_lib.evaluation.planted_truth_metrics`). A failure here is logged, never raised.
    """
    import numpy as np
    import pandas as pd

    from phenocoder_lib.evaluation import planted_truth_metrics

    from ..state import SUMMARY, read_json

    try:
        sample_wells = {}
        for s in samples:
            if storage.exists("sdata", s):
                info = read_json(storage.local_path("sdata", s) / SUMMARY)
                if info.get("plate_dir") and info.get("well"):
                    sample_wells[s] = (info["plate_dir"], str(info["well"]))
        frames = []
        for s in sample_wells:
            if not storage.exists("clusters", s):
                continue
            lab = pd.read_parquet(storage.local_path("clusters", s) / LABELS_FILE)
            key = [c for c in lab.columns if c != "obs_name" and not c.endswith("_confidence")][0]
            names = lab["obs_name"].astype(str)
            ok = names.str.startswith(f"{s}_").to_numpy()
            label = pd.to_numeric(names[ok].str[len(s) + 1:], errors="coerce")
            frames.append(pd.DataFrame({"sample": s, "label": label.to_numpy(),
                                        "cluster": lab.loc[ok, key].astype(str).to_numpy()}).dropna())
        objects = pd.concat(frames, ignore_index=True) if frames else None
        metrics = planted_truth_metrics(sample_wells, embedding=np.asarray(emb.obsm["X_pca"]),
                                        samples=[str(v) for v in emb.obs_names], object_labels=objects)
    except Exception as err:  # auxiliary: never fail the embedding over its validation
        context.log.warning(f"planted-truth validation skipped: {type(err).__name__}: {err}")
        return {}
    if metrics is None:
        return {}
    context.log.info(f"planted truth: {metrics}")
    return {f"planted_truth/{k}": number(float(v)) for k, v in metrics.items()}
