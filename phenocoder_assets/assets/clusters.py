"""Cluster labels that mean the same thing in every well.

``cluster_reference`` (unpartitioned) pools the latents of the reference samples and runs one
Leiden clustering (:func:`phenocoder_lib.clustering.cluster_features`); it stores the reference
(standardisation, PCA loadings, labelled reference points) and the pooled labels.
``clusters`` (per sample) takes the pooled labels for objects that were part of the reference and
transfers labels by kNN vote (:func:`phenocoder_lib.clustering.transfer_labels`) for every other
object, so a new plate never changes the labels -- and therefore the statistics -- of earlier wells.
Both record the model version whose latents they used; ``clusters`` refuses to mix versions.
"""

from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ..configs import ClusterReferenceConfig, ClustersConfig
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..state import REFERENCE_INFO, read_json
from ..wells import for_each_well, per_sample_asset
from ._common import (
    LABELS_FILE,
    LATENTS_FILE,
    PREVIEW_FILE,
    Timer,
    array_digest,
    check_known_samples,
    digest,
    logical_version,
    number,
    preview_metadata,
    read_version,
    settings_of,
    write_png,
    write_version,
)

REFERENCE_FILE = "reference.npz"
POOLED_LABELS_FILE = "pooled_labels.parquet"
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
    import anndata as ad
    import pandas as pd

    from phenocoder_lib.clustering import cluster_features
    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.keys import MESSAGE_PASSING_LAYER

    from ..previews import scatter, two_columns

    check_known_samples(context, list(config.samples), "ClusterReferenceConfig.samples")
    samples = config.samples or storage.partitions("latents")
    if not samples:
        raise FileNotFoundError("no latents materialized yet: materialize 'latents' for some samples first.")
    timer = Timer()
    with timer.phase("read"):
        tables = [ad.read_h5ad(storage.local_path("latents", s) / LATENTS_FILE) for s in samples]
    models = sorted({t.uns["phenocoder_latents"]["model"] for t in tables})
    if len(models) != 1:
        raise ValueError(f"the latents of the reference samples come from different models {models}; re-encode "
                         "them (materialize 'latents' for all samples) before building the reference.")
    pooled = ad.concat(tables, join="inner", merge="first")
    layer = MESSAGE_PASSING_LAYER if config.use_message_passing else None
    with timer.phase("cluster"):
        labels, ref = cluster_features(pooled, layer=layer, scale=config.scale, n_pcs=config.n_pcs,
                                       n_neighbors=config.n_neighbors, resolution=config.resolution,
                                       n_iterations=config.n_iterations, seed=config.seed,
                                       max_reference=config.max_reference, transfer_k=config.transfer_k,
                                       max_fit=config.max_fit, knn=config.knn)
    sample_key = tables[0].uns["phenocoder_latents"]["sample_key"]
    frame = pd.DataFrame({"obs_name": pooled.obs_names.astype(str),
                          "sample": pooled.obs[sample_key].astype(str).to_numpy(),
                          "label": pd.Categorical(labels)})
    # content digest of the reference (labels, loadings, labelled points): it names the reference that
    # the clusters and graph_stats of every well record, and is the asset's data version
    version = digest("cluster_reference", array_digest([frame["obs_name"], frame["sample"], labels, ref.pca_mean,
                                                        ref.pca_components, ref.ref_embedding, ref.ref_labels]),
                     list(ref.categories), layer or "")
    inputs = {f"latents/{s}": read_version(storage, "latents", s) for s in samples}
    info = {"id": version[:12], "model": models[0], "samples": list(samples),
            "categories": list(ref.categories), "layer": layer or "", "n_objects": int(pooled.n_obs),
            "params": ref.params}
    ref_names = [ref.categories[i] for i in ref.ref_labels]
    png = scatter(two_columns(ref.ref_embedding), ref_names, title="reference objects (PC1, PC2) by cluster",
                  xlabel="PC1", ylabel="PC2", size=3)
    with storage.stage("cluster_reference") as out:
        out.mkdir()
        ref.save(out / REFERENCE_FILE)
        frame.to_parquet(out / POOLED_LABELS_FILE, index=False)
        write_json_atomic(out / REFERENCE_INFO, info)
        write_png(out / PREVIEW_FILE, png)
        data_version = write_version(out, version, inputs)
    counts = frame["label"].value_counts().sort_index()
    final = storage.url("cluster_reference")
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, "cluster reference", final),
        "n_clusters": MetadataValue.int(len(ref.categories)),
        "n_objects": MetadataValue.int(int(pooled.n_obs)),
        "samples": MetadataValue.json(list(samples)),
        "model": MetadataValue.text(models[0]),
        "reference_id": MetadataValue.text(info["id"]),
        "cluster_sizes": MetadataValue.json({str(k): int(v) for k, v in counts.items()}),
        "path": MetadataValue.path(final),
        **timer.metadata(),
    })


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
    """One well of ``clusters``."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from phenocoder_lib.clustering import ClusterReference, transfer_labels

    from ..previews import scatter

    ref_dir = storage.local_path("cluster_reference")
    info = read_json(ref_dir / REFERENCE_INFO)
    table = ad.read_h5ad(storage.local_path("latents", sample) / LATENTS_FILE)
    model = table.uns["phenocoder_latents"]["model"]
    if model != info["model"]:
        raise ValueError(f"the latents of {sample!r} come from model {model!r} but the cluster reference was built on "
                         f"{info['model']!r}; rebuild 'cluster_reference' (or re-encode {sample!r}) first.")
    ref = ClusterReference.load(ref_dir / REFERENCE_FILE)
    inputs = {"latents": read_version(storage, "latents", sample),
              "cluster_reference": read_version(storage, "cluster_reference")}
    version = logical_version(CLUSTERS_CODE_VERSION, settings_of(config), inputs)
    timer = Timer()
    obs_names = table.obs_names.astype(str)
    pooled = pd.read_parquet(ref_dir / POOLED_LABELS_FILE)
    pooled = pooled[pooled["sample"] == sample].set_index("obs_name")["label"].astype(str)
    with timer.phase("label"):
        if len(pooled) and set(obs_names) <= set(pooled.index):
            labels = pd.Categorical(pooled.reindex(obs_names).to_numpy(), categories=ref.categories)
            confidence = np.ones(len(obs_names))
            source = "pooled"
        else:
            labels, confidence = transfer_labels(ref, table, k=config.transfer_k)
            source = "transfer"
    frame = pd.DataFrame({"obs_name": obs_names, config.key_added: labels,
                          f"{config.key_added}_confidence": confidence})
    coords = np.asarray(table.obsm["spatial"])[:, [1, 0]]
    png = scatter(coords, np.asarray(labels), title=f"{sample}: clusters ({source})", xlabel="x (um)",
                  ylabel="y (um)", invert_y=True, size=5)
    with storage.stage("clusters", sample) as out:
        out.mkdir()
        frame.to_parquet(out / LABELS_FILE, index=False)
        write_png(out / PREVIEW_FILE, png)
        data_version = write_version(out, version, inputs)
    counts = pd.Series(np.asarray(labels)).value_counts()
    final = storage.url("clusters", sample)
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, f"{sample}: clusters", final),
        "n_objects": MetadataValue.int(len(frame)),
        "source": MetadataValue.text(source),
        "reference_id": MetadataValue.text(info["id"]),
        "mean_confidence": number(float(np.mean(confidence)) if len(confidence) else float("nan")),
        "cluster_sizes": MetadataValue.json({str(k): int(v) for k, v in counts.items()}),
        "path": MetadataValue.path(f"{final}/{LABELS_FILE}"),
        **timer.metadata(),
    })
