"""``graph_stats`` (per sample) and ``embedding`` (all samples): steps 5 and 6 of the workflow guide."""

from dagster import (
    AllPartitionMapping,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    asset,
)

from ..configs import EmbeddingConfig, GraphStatsConfig
from ..metadata import CHECK_GRAPH_STATS_COMPLETE
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import (
    EMBEDDING_FILE,
    LABELS_FILE,
    LATENTS_FILE,
    STATS_FILE,
    logical_version,
    read_version,
    sdata_summaries,
    settings_of,
    write_version,
)

CHECK_COMPLETE = CHECK_GRAPH_STATS_COMPLETE
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
    """One well of ``graph_stats`` (:func:`phenocoder_lib.pipeline.well_graph_stats`)."""
    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.pipeline import well_graph_stats

    from ..metadata import graph_stats_result
    from ..state import REFERENCE_INFO, SUMMARY, read_json

    inputs = {"latents": read_version(storage, "latents", sample),
              "clusters": read_version(storage, "clusters", sample),
              "cluster_reference": read_version(storage, "cluster_reference")}
    version = logical_version(GRAPH_STATS_CODE_VERSION, settings_of(config, GRAPH_STATS_COSMETIC), inputs)
    reference = read_json(storage.local_path("cluster_reference") / REFERENCE_INFO)
    with storage.stage("graph_stats", sample) as out:
        computed = well_graph_stats(storage.local_path("latents", sample) / LATENTS_FILE,
                                    storage.local_path("clusters", sample) / LABELS_FILE, out / STATS_FILE,
                                    sample=sample, reference_info=reference, **settings_of(config))
        write_json_atomic(out / SUMMARY, computed.summary)
        data_version = write_version(out, version, inputs)
        result = graph_stats_result(computed, sample, out, storage.url("graph_stats", sample), data_version)
    return result


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
    """:func:`phenocoder_lib.embedding.spatialgraph_embedding` over the graph_stats of all samples (read by path).

    On synthetic plates the embedding and the cluster labels are also scored against the planted truth
    (:func:`phenocoder_lib.evaluation.planted_truth_metrics`); a failure there is logged, never raised.
    """
    from phenocoder_lib.pipeline import embed_wells

    from ..metadata import embedding_result

    samples = storage.partitions("graph_stats")
    if len(samples) < 2:
        raise ValueError(f"the embedding needs the graph_stats of at least 2 samples, found {samples}; materialize "
                         "'graph_stats' for more samples first.")
    inputs = {f"graph_stats/{s}": read_version(storage, "graph_stats", s) for s in samples}
    version = logical_version(EMBEDDING_CODE_VERSION, settings_of(config), inputs)
    labels = {s: storage.local_path("clusters", s) / LABELS_FILE for s in samples if storage.exists("clusters", s)}
    with storage.stage("embedding") as out:
        out.mkdir()
        embedded = embed_wells({s: storage.local_path("graph_stats", s) / STATS_FILE for s in samples},
                               out / EMBEDDING_FILE, summaries=sdata_summaries(storage, samples), labels_files=labels,
                               **settings_of(config))
        data_version = write_version(out, version, inputs)
        result = embedding_result(context, embedded, out, storage.url("embedding"), data_version)
    return result
