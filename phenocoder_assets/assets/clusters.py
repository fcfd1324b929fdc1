"""Cluster labels that mean the same thing in every well.

``cluster_reference`` (unpartitioned) pools the latents of the reference samples and runs one
Leiden clustering (:func:`phenocoder_lib.clustering.cluster_features`); it stores the reference
(standardisation, PCA loadings, labelled reference points) and the pooled labels.
``clusters`` (per sample) takes the pooled labels for objects that were part of the reference and
transfers labels by kNN vote (:func:`phenocoder_lib.clustering.transfer_labels`) for every other
object, so a new plate never changes the labels -- and therefore the statistics -- of earlier wells.
Both record the model version whose latents they used; ``clusters`` refuses to mix versions.
"""

from dagster import AllPartitionMapping, AssetDep, AssetExecutionContext, MaterializeResult, asset

from ..configs import ClusterReferenceConfig, ClustersConfig
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..state import REFERENCE_INFO, read_json
from ..wells import for_each_well, per_sample_asset
from ._common import (
    LABELS_FILE,
    LATENTS_FILE,
    check_known_samples,
    logical_version,
    read_version,
    settings_of,
    write_version,
)

REFERENCE_CODE_VERSION = "2"  # 2: faiss kNN graph from 8192 objects on; fit capped at max_fit objects
CLUSTERS_CODE_VERSION = "1"


@asset(
    deps=[AssetDep("latents", partition_mapping=AllPartitionMapping())],
    group_name="cross_sample",
    kinds={"scanpy", "numpy"},
    code_version=REFERENCE_CODE_VERSION,
    description=describe("cluster_reference", "Pooled Leiden clustering of the latents of the reference samples; "
                         "the reference that labels every later sample the same way "
                         "(`<root>/cluster_reference/_/`)."),
)
def cluster_reference(context: AssetExecutionContext, config: ClusterReferenceConfig,
                      storage: PhenocoderStorage) -> MaterializeResult:
    """:func:`phenocoder_lib.clustering.cluster_features` on the concatenated latents (read by path)."""
    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.pipeline import build_cluster_reference

    from ..metadata import cluster_reference_result

    check_known_samples(context, list(config.samples), "ClusterReferenceConfig.samples")
    samples = config.samples or storage.partitions("latents")
    if not samples:
        raise FileNotFoundError("no latents materialized yet: materialize 'latents' for some samples first.")
    inputs = {f"latents/{s}": read_version(storage, "latents", s) for s in samples}
    with storage.stage("cluster_reference") as out:
        # the data version is the content digest of the reference: it names the reference that the
        # clusters and graph_stats of every well record
        built = build_cluster_reference({s: storage.local_path("latents", s) / LATENTS_FILE for s in samples}, out,
                                        **settings_of(config, ("samples",)))
        write_json_atomic(out / REFERENCE_INFO, built.info)
        data_version = write_version(out, built.version, inputs)
        result = cluster_reference_result(built, out, storage.url("cluster_reference"), data_version)
    return result


@per_sample_asset(
    deps=["latents", "cluster_reference"],
    kinds={"parquet"},
    code_version=CLUSTERS_CODE_VERSION,
    description=describe("clusters", "Cluster label of every object of a well, consistent across wells "
                         "(`<root>/clusters/<sample>/labels.parquet`)."),
)
def clusters(context: AssetExecutionContext, config: ClustersConfig, storage: PhenocoderStorage):
    """Pooled labels for reference objects, :func:`~phenocoder_lib.clustering.transfer_labels` for the rest."""
    yield from for_each_well(context, lambda sample: _clusters_one(context, config, storage, sample),
                             upstream=('latents',))


def _clusters_one(context: AssetExecutionContext, config: ClustersConfig, storage: PhenocoderStorage,
                  sample: str) -> MaterializeResult:
    """One well of ``clusters`` (:func:`phenocoder_lib.pipeline.label_well`)."""
    from phenocoder_lib.pipeline import label_well

    from ..metadata import clusters_result

    ref_dir = storage.local_path("cluster_reference")
    inputs = {"latents": read_version(storage, "latents", sample),
              "cluster_reference": read_version(storage, "cluster_reference")}
    version = logical_version(CLUSTERS_CODE_VERSION, settings_of(config), inputs)
    with storage.stage("clusters", sample) as out:
        labels = label_well(storage.local_path("latents", sample) / LATENTS_FILE, ref_dir, out / LABELS_FILE,
                            sample=sample, reference_info=read_json(ref_dir / REFERENCE_INFO), **settings_of(config))
        data_version = write_version(out, version, inputs)
        result = clusters_result(labels, sample, out, storage.url("clusters", sample), data_version)
    return result
