"""The workflow one partition at a time, for the Dagster assets (no Dagster import).

Each stage is a function from files and settings to a typed result that carries what the asset
records; the :class:`~phenocoder_lib.Phenocoder` facade and these functions both call the library
functions that do the work (e.g. :func:`phenocoder_lib.training.train`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import write_json_atomic
from .validation import check_int

__all__ = ["EncodedWell", "NORMALIZATION_FILE", "encode_well", "train_model"]


# --- model chain ---

#: Beside the model: per training dataset, the patch geometry and normalization that encoding reproduces.
NORMALIZATION_FILE = "normalization.json"


def train_model(
    dataset_dirs: Sequence[str | Path],
    out_dir: str | Path,
    settings: Mapping[str, Any],
    *,
    keys: Mapping[str, str],
    obs: Any = None,
    **train_kwargs: Any,
) -> Any:
    """Train a model on per-sample patch dataset folders and write its folder (``out_dir``, created).

    Parameters
    ----------
    dataset_dirs
        Patch dataset folders (:func:`phenocoder_lib.patches.generate_dataset`); their names are the
        dataset names (the ``dataset`` condition) and must be distinct.
    out_dir
        The model folder: ``model.keras``, ``model_config.json``, ``checkpoint.keras``, ``history.json``/``.csv``,
        the previews, :data:`NORMALIZATION_FILE` and ``tensorboard/``.
    settings
        Fields of :class:`~phenocoder_lib.model_config.ModelSettings`.
    keys
        ``table_key``, ``sample_key``, ``image_key`` (and ``spatial_key``) of the source data.
    obs
        The training objects' ``.obs``, for conditions that are not columns of the patch index.
    **train_kwargs
        Arguments of :func:`phenocoder_lib.training.train` (``n_epochs``, ``on_epoch_end``, ...).

    Returns
    -------
    phenocoder_lib.training.TrainedModel
        The trained model, its configuration, history and folder.
    """
    from . import training
    from .patches import PatchDataset

    dirs = [Path(d) for d in dataset_dirs]
    if not dirs:
        raise ValueError("dataset_dirs is empty: pass at least one patch dataset folder.")
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folders must have distinct names (they are the dataset names), got {names}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = training.train([PatchDataset.open(d) for d in dirs], out_dir, settings, keys=keys, obs=obs,
                             log_dir=out_dir / "tensorboard", **train_kwargs)
    write_json_atomic(out_dir / NORMALIZATION_FILE, {
        name: {k: ds[k] for k in ("patch_size", "channels", "spatial_key_index", "normalization")}
        for name, ds in trained.config["dataset_settings"].items()})
    return trained


@dataclass
class EncodedWell:
    """The latents of one well and the checks on them.

    Parameters
    ----------
    table
        The ``phenocoder`` table of the well (:func:`phenocoder_lib.encoding.encode_table`).
    n_expected
        Objects of the well's source table.
    missing
        Those without a latent (sorted names; expected empty).
    n_non_finite
        NaN or infinite latent values (expected 0).
    pcs
        (n, 2) coordinates of the latents on their first two principal axes, for a preview (``None``
        below two objects).
    """

    table: Any
    n_expected: int
    missing: list[str]
    n_non_finite: int
    pcs: Any = None


def encode_well(
    trained: Any,
    sdata: Any,
    sample: str,
    *,
    keys: Mapping[str, str],
    spatial_key: str = "spatial",
    batch_size: int = 512,
    spatial_message_passing_radius: float | None = None,
    data_dir: str | Path | None = None,
) -> EncodedWell:
    """Encode the objects of one well with a trained model and check the result.

    Parameters
    ----------
    trained
        A :class:`~phenocoder_lib.training.TrainedModel` (e.g. :func:`phenocoder_lib.training.load_model`).
    sdata
        SpatialData holding the well's table and images.
    sample
        The well (a value of the sample column).
    keys
        ``table_key``, ``sample_key`` and ``image_key`` of ``sdata``.
    spatial_key, batch_size, spatial_message_passing_radius
        See :func:`phenocoder_lib.encoding.encode_table`.
    data_dir
        Folder of the training patch datasets (their stored patches are reused when they match).

    Returns
    -------
    EncodedWell
        The table, the objects without a latent, the count of non-finite values and the preview's PCs.
    """
    import numpy as np

    from .encoding import encode_table
    from .plotting import principal_components

    out = encode_table(trained.model, sdata, model_config=trained.config, table_key=keys["table_key"],
                       sample_key=keys["sample_key"], image_key=keys["image_key"], spatial_key=spatial_key,
                       batch_size=batch_size, spatial_message_passing_radius=spatial_message_passing_radius,
                       data_dir=data_dir, samples=[sample])
    x = np.asarray(out.X)
    expected = set(sdata.tables[keys["table_key"]].obs_names.astype(str))
    missing = sorted(expected - set(out.obs_names.astype(str)))
    pcs = principal_components(x) if out.n_obs >= 2 else None
    return EncodedWell(table=out, n_expected=len(expected), missing=missing,
                       n_non_finite=int((~np.isfinite(x)).sum()), pcs=pcs)


# --- per-well stages ---
# One function per Dagster asset of the per-well chain and of the cross-sample steps after it: each reads
# the upstream files it is given, does the stage's work, writes the stage's files into the (staged)
# output folder and returns a dataclass with what the asset reports (pictures and metadata are drawn
# from it on the Dagster side). The asset keeps the storage, data versions and the run's bookkeeping.

#: Files of the ``cluster_reference`` folder written by :func:`build_cluster_reference`.
REFERENCE_FILE = "reference.npz"
POOLED_LABELS_FILE = "pooled_labels.parquet"


@contextlib.contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Record the wall-clock seconds of the block as ``seconds[phase]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = time.perf_counter() - t0


def content_digest(*parts: Any) -> str:
    """Digest of JSON-able parts: the data versions of the stages are such digests, never random.

    Parameters
    ----------
    *parts
        Values written as canonical JSON (sorted keys; numpy scalars and paths via ``str``).

    Returns
    -------
    str
        The first 24 hex digits of the SHA-256 of that JSON.
    """
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def array_digest(arrays: Iterable[Any]) -> str:
    """Content digest of arrays (their dtypes, shapes and bytes; object arrays as strings).

    Parameters
    ----------
    arrays
        Arrays or array-likes (lists, pandas columns, categoricals).

    Returns
    -------
    str
        The first 24 hex digits of the SHA-256.
    """
    import numpy as np

    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(np.asarray(arr))
        if a.dtype == object:
            a = a.astype(str)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


@dataclass
class IngestedWell:
    """One well read from a plate export by :func:`ingest_well`.

    Parameters
    ----------
    sdata
        The well as a SpatialData object.
    image
        Its image (``xarray.DataArray``, dims ``c[, z], y, x``).
    summary
        Sample, plate, well, plate folder, keys, sizes and channels (``summary.json``).
    seconds
        Wall-clock seconds of ``read`` and ``write``.
    """

    sdata: Any
    image: Any
    summary: dict[str, Any]
    seconds: dict[str, float]

    @property
    def n_objects(self) -> int:
        """Objects (rows) of the well's table."""
        return int(self.summary["n_objects"])

    @property
    def n_features(self) -> int:
        """Feature columns of the well's table."""
        return int(self.summary["n_features"])


def ingest_well(
    plate_dir: str | Path,
    sdata_file: str | Path,
    *,
    plate: str,
    well: str,
    layout: Any,
    table_key: str,
    image_key: str,
    sample_key: str,
    pixel_size_um: float | None = None,
    z_step_um: float | None = None,
    table_scale: float | None = None,
    source_digest: str | None = None,
    files: Any = None,
) -> IngestedWell:
    """Read one well of a plate export and write it as a SpatialData zarr store.

    Parameters
    ----------
    plate_dir
        The plate export folder.
    sdata_file
        Zarr store to write (``sdata.zarr``).
    plate, well
        Plate id (the sample prefix) and well of the export.
    layout
        :class:`phenocoder_lib.ingest.PlateLayout` of the export's files.
    table_key, image_key, sample_key
        Names of the object table, the image prefix and the sample column.
    pixel_size_um, z_step_um, table_scale
        Geometry overrides of :func:`phenocoder_lib.ingest.read_plate` (``None``: from ``plate.json``).
    source_digest
        Digest of the well's files, recorded in the summary (what the well was when it was read).
    files
        The plate's (or the well's) :class:`phenocoder_lib.ingest.PlateFiles`, scanned once for a plate run;
        default: scan ``plate_dir``.

    Returns
    -------
    IngestedWell
        The well, its image and its summary.
    """
    from .ingest import read_plate, sample_id, write_sdata

    seconds: dict[str, float] = {}
    with _timed(seconds, "read"):
        sd = read_plate(plate_dir, wells=[well], plate=plate, layout=layout, pixel_size_um=pixel_size_um,
                        z_step_um=z_step_um, table_scale=table_scale, image_key=image_key, table_key=table_key,
                        sample_key=sample_key, files=files)
    sample = sample_id(plate, well)
    table = sd.tables[table_key]
    image = sd.images[f"{image_key}_{sample}"]
    with _timed(seconds, "write"):
        write_sdata(sd, sdata_file)
    summary = {
        "sample": sample, "plate": plate, "well": well, "plate_dir": str(plate_dir), "source_digest": source_digest,
        "table_key": table_key, "image_key": image_key, "sample_key": sample_key,
        "n_objects": int(table.n_obs), "n_features": int(table.n_vars),
        "image_shape": [int(s) for s in image.shape], "image_dims": list(image.dims),
        "channels": [str(c) for c in image.coords["c"].values],
    }
    return IngestedWell(sdata=sd, image=image, summary=summary, seconds=seconds)


@dataclass
class WellPatches:
    """The patch dataset of one well written by :func:`extract_patches`.

    Parameters
    ----------
    dataset
        The :class:`phenocoder_lib.patches.PatchDataset`.
    n_objects
        Objects of the well's table.
    missing
        Objects of the table without a patch (sorted names).
    anchors
        The well's normalization anchors (``low``/``high``), None unscaled.
    seconds
        Wall-clock seconds of ``extract``.
    """

    dataset: Any
    n_objects: int
    missing: list[str]
    anchors: dict[str, list[float]] | None
    seconds: dict[str, float]

    @property
    def n_patches(self) -> int:
        """Patches written."""
        return len(self.dataset.index)


def extract_patches(
    sdata_file: str | Path,
    out_dir: str | Path,
    *,
    table_key: str,
    sample_key: str,
    image_key: str,
    **options: Any,
) -> WellPatches:
    """Patch dataset of one well's SpatialData store, named after the output folder.

    Parameters
    ----------
    sdata_file
        The well's SpatialData zarr store (written by :func:`ingest_well`).
    out_dir
        Dataset folder to write; its name is the dataset name (the well's sample).
    table_key, sample_key, image_key
        Where the store's object table, sample column and images are.
    **options
        The other arguments of :func:`phenocoder_lib.patches.generate_dataset` (``patch_size``,
        ``scale``, ``n_patches``, ``seed``, ...).

    Returns
    -------
    WellPatches
        The dataset, the objects it misses and the anchors that scaled it.
    """
    import spatialdata

    from .patches import generate_dataset

    out_dir = Path(out_dir)
    sd = spatialdata.read_zarr(sdata_file)
    seconds: dict[str, float] = {}
    with _timed(seconds, "extract"):
        ds = generate_dataset(sd, dataset=out_dir.name, dir_dataset=out_dir.parent, table_key=table_key,
                              sample_key=sample_key, image_key=image_key, **options)
    expected = set(sd.tables[table_key].obs_names.astype(str))
    missing = sorted(expected - set(ds.index["obs_name"].astype(str)))
    norm = ds.settings["normalization"]
    anchors = norm["per_sample"].get(out_dir.name) if norm["scale_per_sample"] else norm["global"]
    return WellPatches(dataset=ds, n_objects=len(expected), missing=missing, anchors=anchors, seconds=seconds)


@dataclass
class ReferenceClustering:
    """The pooled clustering of the reference samples built by :func:`build_cluster_reference`.

    Parameters
    ----------
    reference
        The :class:`phenocoder_lib.clustering.ClusterReference` that labels new objects.
    labels
        ``obs_name``, ``sample``, ``label`` of every pooled object.
    info
        Id, model, samples, categories, layer, n_objects, params (``reference_info.json``).
    version
        Content digest of the labels and the reference (its data version; ``info['id']`` is a prefix).
    seconds
        Wall-clock seconds of ``read`` and ``cluster``.
    """

    reference: Any
    labels: pd.DataFrame
    info: dict[str, Any]
    version: str
    seconds: dict[str, float]

    @property
    def cluster_sizes(self) -> dict[str, int]:
        """Objects per cluster, in category order."""
        counts = self.labels["label"].value_counts().sort_index()
        return {str(k): int(v) for k, v in counts.items()}


def build_cluster_reference(
    latents_files: Mapping[str, str | Path],
    out_dir: str | Path,
    *,
    use_message_passing: bool = False,
    **cluster_kwargs: Any,
) -> ReferenceClustering:
    """Cluster the pooled latents of the reference samples and store the reference that labels every well.

    Writes :data:`REFERENCE_FILE` (standardisation, PCA loadings, labelled reference points) and
    :data:`POOLED_LABELS_FILE` (the pooled labels) into ``out_dir``.

    Parameters
    ----------
    latents_files
        ``sample -> latents.h5ad`` of the reference samples (in this order).
    out_dir
        Folder to write (created).
    use_message_passing
        Cluster the message-passed layer (:data:`phenocoder_lib.keys.MESSAGE_PASSING_LAYER`) instead of ``X``.
    **cluster_kwargs
        Arguments of :func:`phenocoder_lib.clustering.cluster_features` (``resolution``, ``seed``, ...).

    Returns
    -------
    ReferenceClustering
        The reference, the pooled labels, their record and content digest.

    Raises
    ------
    ValueError
        When the latents come from different models.
    """
    import anndata as ad

    from .clustering import cluster_features
    from .keys import MESSAGE_PASSING_LAYER

    seconds: dict[str, float] = {}
    samples = list(latents_files)
    with _timed(seconds, "read"):
        tables = [ad.read_h5ad(latents_files[s]) for s in samples]
    models = sorted({t.uns["phenocoder_latents"]["model"] for t in tables})
    if len(models) != 1:
        raise ValueError(f"the latents of the reference samples come from different models {models}; re-encode "
                         "them (materialize 'latents' for all samples) before building the reference.")
    pooled = ad.concat(tables, join="inner", merge="first")
    layer = MESSAGE_PASSING_LAYER if use_message_passing else None
    with _timed(seconds, "cluster"):
        labels, ref = cluster_features(pooled, layer=layer, **cluster_kwargs)
    sample_key = tables[0].uns["phenocoder_latents"]["sample_key"]
    frame = pd.DataFrame({"obs_name": pooled.obs_names.astype(str),
                          "sample": pooled.obs[sample_key].astype(str).to_numpy(),
                          "label": pd.Categorical(labels)})
    # content digest of the reference (labels, loadings, labelled points): it names the reference that
    # the clusters and graph_stats of every well record
    version = content_digest("cluster_reference", array_digest([
        frame["obs_name"], frame["sample"], labels, ref.pca_mean, ref.pca_components, ref.ref_embedding,
        ref.ref_labels]), list(ref.categories), layer or "")
    info = {"id": version[:12], "model": models[0], "samples": samples, "categories": list(ref.categories),
            "layer": layer or "", "n_objects": int(pooled.n_obs), "params": ref.params}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref.save(out_dir / REFERENCE_FILE)
    frame.to_parquet(out_dir / POOLED_LABELS_FILE, index=False)
    return ReferenceClustering(reference=ref, labels=frame, info=info, version=version, seconds=seconds)


@dataclass
class WellLabels:
    """Cluster labels of one well given by :func:`label_well`.

    Parameters
    ----------
    labels
        ``obs_name``, the label column and ``<label column>_confidence``.
    key
        The label column.
    source
        ``pooled`` (the well was a reference sample) or ``transfer`` (kNN vote).
    coords
        (x, y) position of every object (um), for pictures.
    reference_id
        The cluster reference that labelled them.
    seconds
        Wall-clock seconds of ``label``.
    """

    labels: pd.DataFrame
    key: str
    source: str
    coords: np.ndarray
    reference_id: str
    seconds: dict[str, float]

    @property
    def mean_confidence(self) -> float:
        """Mean share of agreeing voters (1 for pooled labels; NaN for an empty well)."""
        confidence = self.labels[f"{self.key}_confidence"].to_numpy()
        return float(np.mean(confidence)) if len(confidence) else float("nan")

    @property
    def cluster_sizes(self) -> dict[str, int]:
        """Objects per cluster, largest first."""
        counts = pd.Series(self.labels[self.key].astype(object).to_numpy()).value_counts()
        return {str(k): int(v) for k, v in counts.items()}


def label_well(
    latents_file: str | Path,
    reference_dir: str | Path,
    labels_file: str | Path,
    *,
    sample: str,
    reference_info: Mapping[str, Any],
    transfer_k: int | None = None,
    key_added: str = "leiden",
) -> WellLabels:
    """Label the objects of one well with the clusters of the reference and write them as parquet.

    Objects that were part of the reference keep their pooled label; any other well is labelled by
    :func:`phenocoder_lib.clustering.transfer_labels`, so a new plate never changes earlier labels.

    Parameters
    ----------
    latents_file
        The well's ``latents.h5ad``.
    reference_dir
        Folder written by :func:`build_cluster_reference`.
    labels_file
        Parquet file to write (``obs_name``, ``key_added``, ``<key_added>_confidence``).
    sample
        The well's sample name.
    reference_info
        The reference's record (:attr:`ReferenceClustering.info`).
    transfer_k
        Voting neighbours (``None``: the reference's).
    key_added
        Name of the label column.

    Returns
    -------
    WellLabels
        The labels, where they came from and the objects' positions.

    Raises
    ------
    ValueError
        When the well's latents come from another model than the reference's.
    """
    import anndata as ad

    from .clustering import ClusterReference, transfer_labels
    from .keys import SPATIAL_KEY

    reference_dir = Path(reference_dir)
    table = ad.read_h5ad(latents_file)
    model = table.uns["phenocoder_latents"]["model"]
    if model != reference_info["model"]:
        raise ValueError(f"the latents of {sample!r} come from model {model!r} but the cluster reference was built on "
                         f"{reference_info['model']!r}; rebuild 'cluster_reference' (or re-encode {sample!r}) first.")
    ref = ClusterReference.load(reference_dir / REFERENCE_FILE)
    obs_names = table.obs_names.astype(str)
    pooled = pd.read_parquet(reference_dir / POOLED_LABELS_FILE)
    pooled = pooled[pooled["sample"] == sample].set_index("obs_name")["label"].astype(str)
    seconds: dict[str, float] = {}
    with _timed(seconds, "label"):
        if len(pooled) and set(obs_names) <= set(pooled.index):
            labels = pd.Categorical(pooled.reindex(obs_names).to_numpy(), categories=ref.categories)
            confidence, source = np.ones(len(obs_names)), "pooled"
        else:
            labels, confidence = transfer_labels(ref, table, k=transfer_k)
            source = "transfer"
    frame = pd.DataFrame({"obs_name": obs_names, key_added: labels, f"{key_added}_confidence": confidence})
    Path(labels_file).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(labels_file, index=False)
    return WellLabels(labels=frame, key=key_added, source=source,
                      coords=np.asarray(table.obsm[SPATIAL_KEY])[:, [1, 0]],
                      reference_id=str(reference_info["id"]), seconds=seconds)


def cluster_column(labels: pd.DataFrame) -> str:
    """The label column of a well's labels table (written by :func:`label_well`).

    Parameters
    ----------
    labels
        Columns ``obs_name``, the label column and its ``*_confidence`` column.

    Returns
    -------
    str
        The one column that is neither ``obs_name`` nor a confidence.

    Raises
    ------
    ValueError
        When the table has no label column.
    """
    columns = [c for c in labels.columns if c != "obs_name" and not str(c).endswith("_confidence")]
    if not columns:
        raise ValueError(f"the labels table has no label column (columns {list(labels.columns)}); rematerialize "
                         "'clusters'.")
    return str(columns[0])


def object_label_ids(obs_names: Sequence[str], sample: str) -> tuple[np.ndarray, np.ndarray]:
    """Label ids of the objects of a well from their names ``<sample>_<label id>``.

    Parameters
    ----------
    obs_names
        Object names (as :func:`phenocoder_lib.ingest.read_plate` writes them).
    sample
        The well's sample name.

    Returns
    -------
    tuple of numpy.ndarray
        A mask of the names of that form, and the label id of each of them (float; NaN where the rest
        is not a number).
    """
    names = pd.Series(np.asarray(obs_names, dtype=str))
    ok = names.str.startswith(f"{sample}_").to_numpy()
    ids = pd.to_numeric(names[ok].str[len(sample) + 1:], errors="coerce").to_numpy(dtype=float)
    return ok, ids


def interaction_matrix(stats: Any, categories: Sequence[Any], radius: float) -> np.ndarray | None:
    """Cluster x cluster neighbourhood-enrichment z-scores of a well at one radius (mean over rows).

    Parameters
    ----------
    stats
        Statistics of :func:`phenocoder_lib.spatial.compute_spatial_stats` (rows: the well or its subunits).
    categories
        The clusters, in order.
    radius
        The graph radius (um) to show.

    Returns
    -------
    numpy.ndarray or None
        (n_clusters, n_clusters) z-scores (NaN: a pair absent from every row), or ``None`` when the
        interactions group was not computed or there is no row.
    """
    from .spatial.stats import format_radius

    cats = [str(c) for c in categories]
    columns = [f"radius:{format_radius(radius)}_stat:interactions_enrichment_zscore_{a}_{b}" for a in cats
               for b in cats]
    if not cats or not set(columns) <= set(stats.var_names):
        return None
    values = np.asarray(stats[:, columns].X, dtype=float)
    if values.shape[0] == 0:
        return None
    with np.errstate(all="ignore"):  # an absent cluster pair is NaN in every row
        matrix = np.nanmean(np.where(np.isfinite(values), values, np.nan), axis=0) if values.shape[0] > 1 \
            else values[0]
    return matrix.reshape(len(cats), len(cats))


@dataclass
class WellGraphStats:
    """Spatial statistics of one well computed by :func:`well_graph_stats`.

    Parameters
    ----------
    stats
        AnnData, one row per well (or subunit), one column per feature.
    summary
        Sample, model, reference_id, n_rows (``summary.json``).
    categories
        The reference's clusters.
    radius
        The smallest radius (the one :attr:`interactions` shows).
    interactions
        :func:`interaction_matrix` at :attr:`radius`.
    expected_features
        The feature columns the settings ask for.
    missing_features
        Of those, the columns not computed.
    seconds
        Wall-clock seconds of ``compute``.
    """

    stats: Any
    summary: dict[str, Any]
    categories: list[str]
    radius: float
    interactions: np.ndarray | None
    expected_features: list[str]
    missing_features: list[str]
    seconds: dict[str, float]

    @property
    def status(self) -> pd.Series:
        """Status of each row (``ok`` or why it was skipped)."""
        return self.stats.obs["status"].astype(str)

    @property
    def n_skipped(self) -> int:
        """Rows not computed (too few objects)."""
        return int((self.status != "ok").sum())

    @property
    def skipped_reasons(self) -> list[str]:
        """Why rows were skipped, one entry per skipped row."""
        return self.stats.obs["skipped_reason"].astype(str)[self.status != "ok"].tolist()

    @property
    def n_nan(self) -> int:
        """Undefined (NaN) values."""
        return int(np.isnan(self.stats.X).sum())

    @property
    def complete(self) -> bool:
        """Every feature column present, every row computed and every count finite."""
        counts = self.stats[:, [c for c in self.stats.var_names if "_stat:counts_" in c]].X
        return not self.missing_features and bool((self.status == "ok").all()) and bool(np.isfinite(counts).all())


def well_graph_stats(
    latents_file: str | Path,
    labels_file: str | Path,
    stats_file: str | Path,
    *,
    sample: str,
    reference_info: Mapping[str, Any],
    stats: Sequence[str] | None = None,
    radii: Sequence[float] = (25.0, 50.0),
    **stats_kwargs: Any,
) -> WellGraphStats:
    """Spatial graph statistics of one well from its latents and cluster labels, written as ``.h5ad``.

    Parameters
    ----------
    latents_file
        The well's ``latents.h5ad`` (objects, coordinates, features).
    labels_file
        Its labels (written by :func:`label_well`).
    stats_file
        ``.h5ad`` file to write.
    sample
        The well's sample name.
    reference_info
        Record of the cluster reference (:attr:`ReferenceClustering.info`): its clusters are the columns.
    stats
        Statistic groups (``None``: all).
    radii
        Graph radii (um).
    **stats_kwargs
        The other arguments of :func:`phenocoder_lib.spatial.compute_spatial_stats` (``seed``, ``n_jobs``, ...).

    Returns
    -------
    WellGraphStats
        The statistics, their provenance and completeness, and the interaction matrix of the picture.

    Raises
    ------
    ValueError
        When objects of the well have no cluster label (labels older than the latents).
    """
    import anndata as ad

    from .keys import PHENOCODER_TABLE
    from .spatial import compute_spatial_stats
    from .spatial.stats import feature_names, normalize_radii, normalize_stats

    table = ad.read_h5ad(latents_file)
    info = table.uns["phenocoder_latents"]
    frame = pd.read_parquet(labels_file)
    key = cluster_column(frame)
    categories = list(reference_info["categories"])
    labels = frame.set_index("obs_name")[key].astype(str).reindex(table.obs_names.astype(str))
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} objects of {sample!r} have no cluster label; rematerialize "
                         f"'clusters' for {sample!r} (its labels are older than its latents).")
    table.obs[key] = pd.Categorical(labels.to_numpy(), categories=categories)
    groups = None if stats is None else [str(s) for s in stats]
    seconds: dict[str, float] = {}
    with _timed(seconds, "compute"):
        result = compute_spatial_stats(table, sample_key=info["sample_key"], cluster_key=key, radii=radii,
                                       stats=groups, progress=False, table_key=PHENOCODER_TABLE, **stats_kwargs)
    for col in ("plate", "well"):  # per-sample constants, for the embedding's obs_keys/batch_key
        if col in table.obs.columns:
            result.obs[col] = str(table.obs[col].astype(str).iloc[0])
    provenance = {"model": info["model"], "reference_id": reference_info["id"]}
    result.uns["phenocoder_graph_stats"] = provenance
    Path(stats_file).parent.mkdir(parents=True, exist_ok=True)
    result.write_h5ad(stats_file)
    groups_t = normalize_stats(groups)
    var_names = [str(v) for v in table.var_names] if "moran_features" in groups_t else []
    expected = feature_names(normalize_radii(radii), groups_t, categories, var_names)
    return WellGraphStats(
        stats=result, summary={"sample": sample, **provenance, "n_rows": int(result.n_obs)},
        categories=[str(c) for c in categories], radius=float(min(radii)),
        interactions=interaction_matrix(result, categories, min(radii)), expected_features=list(expected),
        missing_features=sorted(set(expected) - set(result.var_names)), seconds=seconds)


def planted_truth_objects(labels_files: Mapping[str, str | Path]) -> pd.DataFrame | None:
    """Cluster of every object of the given wells with its label id, to score against planted cell types.

    Parameters
    ----------
    labels_files
        ``sample -> labels.parquet`` (written by :func:`label_well`).

    Returns
    -------
    pandas.DataFrame or None
        Columns ``sample``, ``label`` (the object's label id in its well) and ``cluster``; ``None``
        without wells.
    """
    frames = []
    for sample, path in labels_files.items():
        labels = pd.read_parquet(path)
        ok, ids = object_label_ids(labels["obs_name"].astype(str), sample)
        frames.append(pd.DataFrame({"sample": sample, "label": ids,
                                    "cluster": labels.loc[ok, cluster_column(labels)].astype(str).to_numpy()}).dropna())
    return pd.concat(frames, ignore_index=True) if frames else None


def well_colours(obs: pd.DataFrame, summaries: Mapping[str, Mapping[str, Any]]) -> tuple[list[str] | None, str]:
    """Colour of each well in a picture of the embedding: its treatment when known, else its plate.

    Parameters
    ----------
    obs
        The embedding's rows (index: the samples); a ``treatment`` or ``plate`` column is used.
    summaries
        ``sample -> sdata summary`` (``plate_dir``, ``well``): treatments are read from the plate export's
        ``ground_truth/wells.csv`` (synthetic plates) when every well has one.

    Returns
    -------
    tuple
        (the colour value of each row, or ``None``; what the colours mean: ``treatment``, ``plate``, ``well``).
    """
    if "treatment" in obs.columns:
        return obs["treatment"].astype(str).tolist(), "treatment"
    samples = [str(s) for s in obs.index]
    treatments: dict[str, str] = {}
    try:
        for s in samples:
            info = summaries[s]
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


@dataclass
class WellEmbedding:
    """The embedding of every well's spatial statistics computed by :func:`embed_wells`.

    Parameters
    ----------
    embedding
        AnnData, one row per well (``X_pca``, ``X_umap`` when asked for).
    samples
        The wells embedded, in the order of their statistics.
    key
        The ``.obsm`` entry to draw (``X_umap`` or ``X_pca``).
    colours
        Colour value of each well (:func:`well_colours`).
    legend
        What the colours mean.
    reference_ids
        Cluster references of the statistics (more than one: not comparable).
    planted_truth
        Planted-truth scores (synthetic plates), else ``None``.
    warnings
        Warnings of the embedding and why planted truth was not scored.
    seconds
        Wall-clock seconds of ``read``, ``embed`` and ``planted_truth``.
    """

    embedding: Any
    samples: list[str]
    key: str
    colours: list[str] | None
    legend: str
    reference_ids: list[str]
    planted_truth: dict[str, float] | None
    warnings: list[str]
    seconds: dict[str, float]


def embed_wells(
    stats_files: Mapping[str, str | Path],
    embedding_file: str | Path,
    *,
    summaries: Mapping[str, Mapping[str, Any]],
    labels_files: Mapping[str, str | Path],
    variable_features: bool = False,
    n_variable_features: int | None = None,
    confounder_key: Sequence[str] = (),
    obs_keys: Sequence[str] = ("plate", "well"),
    umap: bool = True,
    **embedding_kwargs: Any,
) -> WellEmbedding:
    """Embed the spatial statistics of every well, write the ``.h5ad`` and score planted truth where known.

    Parameters
    ----------
    stats_files
        ``sample -> stats.h5ad`` (written by :func:`well_graph_stats`), at least two.
    embedding_file
        ``.h5ad`` file to write.
    summaries
        ``sample -> sdata summary`` (``plate_dir``, ``well``) of the wells whose ``sdata`` is known.
    labels_files
        ``sample -> labels.parquet`` of the wells with cluster labels (scored against planted cell types).
    variable_features, n_variable_features
        Keep the variable features (``n_variable_features`` of them when given).
    confounder_key
        ``.obs`` columns regressed out (empty: none).
    obs_keys
        ``.obs`` columns carried to the embedding (those present).
    umap
        Also compute a UMAP (``X_umap``, the one drawn); else ``X_pca`` is drawn.
    **embedding_kwargs
        The other arguments of :func:`phenocoder_lib.embedding.spatialgraph_embedding` (``n_dim``, ``umap``, ...).

    Returns
    -------
    WellEmbedding
        The embedding, the colours of its picture, its warnings and its planted-truth scores.
    """
    import warnings

    import anndata as ad

    from .embedding import spatialgraph_embedding

    seconds: dict[str, float] = {}
    with _timed(seconds, "read"):
        parts = [ad.read_h5ad(path) for path in stats_files.values()]
    refs = sorted({p.uns.get("phenocoder_graph_stats", {}).get("reference_id", "") for p in parts})
    stats = ad.concat(parts, join="outer", merge="first", uns_merge="first")
    stats.uns["spatialgraph_stats"] = dict(parts[0].uns["spatialgraph_stats"])
    variable = n_variable_features if n_variable_features is not None else variable_features
    present = [k for k in obs_keys if k in stats.obs.columns]
    with _timed(seconds, "embed"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emb = spatialgraph_embedding(stats, variable_features=variable, confounder_key=list(confounder_key) or None,
                                     obs_keys=present or None, umap=umap, **embedding_kwargs)
    emb.write_h5ad(embedding_file)
    messages = [f"embedding: {w.message}" for w in caught]
    colours, legend = well_colours(emb.obs, summaries)
    with _timed(seconds, "planted_truth"):
        truth = _planted_truth(emb, summaries, labels_files, messages)
    return WellEmbedding(embedding=emb, samples=list(stats_files), key="X_umap" if umap else "X_pca", colours=colours,
                         legend=legend, reference_ids=refs, planted_truth=truth, warnings=messages, seconds=seconds)


def _planted_truth(emb: Any, summaries: Mapping[str, Mapping[str, Any]], labels_files: Mapping[str, str | Path],
                   messages: list[str]) -> dict[str, float] | None:
    """Planted-truth scores of an embedding when the wells' plate folders hold ground truth, else ``None``.

    Cell types are scored against the cluster labels, treatments against ``X_pca``
    (:func:`phenocoder_lib.evaluation.planted_truth_metrics`). A failure is added to ``messages``, never
    raised: the scores are an extra of the embedding.
    """
    from .evaluation import planted_truth_metrics

    try:
        sample_wells = {s: (info["plate_dir"], str(info["well"])) for s, info in summaries.items()
                        if info.get("plate_dir") and info.get("well")}
        objects = planted_truth_objects({s: labels_files[s] for s in sample_wells if s in labels_files})
        return planted_truth_metrics(sample_wells, embedding=np.asarray(emb.obsm["X_pca"]),
                                     samples=[str(v) for v in emb.obs_names], object_labels=objects)
    except Exception as err:  # auxiliary: never fail the embedding over its validation
        messages.append(f"planted-truth validation skipped: {type(err).__name__}: {err}")
        return None


#: Raw (aggregated, not yet normalized) profiles written by :func:`profile_wells`, per representation.
RAW_REPRESENTATIONS = ("latents", "latents_message_passing", "graph_stats", "arrangement")
#: Scores of the profiles written by :func:`profile_wells` when a layout is known.
EVALUATION_FILE = "evaluation.json"
#: Metrics of each representation reported by the ``well_profiles`` asset.
PROFILE_METRICS = ("map_activity", "map_consistency", "fraction_retrieved_activity", "percent_replicating")


def file_digest(path: str | Path) -> str:
    """Digest of a small file's bytes, or ``"absent"``: a new or edited input file changes what is scored.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    str
        The first 24 hex digits of the SHA-256 of its bytes, or ``"absent"``.
    """
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:24] if path.is_file() else "absent"


def score_profiles(
    frames: Mapping[str, pd.DataFrame],
    sample_info: pd.DataFrame,
    *,
    corr_threshold: float = 0.9,
    sphere: bool = True,
    null_size: int = 10000,
    seed: int = 0,
) -> tuple[dict[str, Any] | None, list[str]]:
    """Normalize and score the well profiles of the plates whose folder holds a ``layout.csv``.

    The profiles are built by :func:`phenocoder_lib.screen_evaluation.build_representations`, the same path
    as ``phenocoder validate --json``: the ``graph_stats`` block holds the cluster interaction statistics
    and the ``arrangement`` features, and is always sphered on the controls.

    Parameters
    ----------
    frames
        ``representation -> raw profiles`` (rows: samples; an ``n_objects`` column is dropped).
    sample_info
        Columns ``sample``, ``plate``, ``well``, ``plate_dir``.
    corr_threshold, sphere
        Feature selection and sphering of :func:`phenocoder_lib.profiles.build_profiles`.
    null_size, seed
        Permutations and seed of :func:`phenocoder_lib.retrieval.evaluate_profiles`.

    Returns
    -------
    tuple
        (strict-JSON scores ``{"n_wells_with_layout", "representations": {name: metrics}}``, or ``None``
        without a layout or when scoring failed; log messages, a failure's starting with
        ``"profile scoring skipped"``).
    """
    from .evaluation import json_safe
    from .retrieval import evaluate_profiles
    from .screen_evaluation import build_representations

    layout = _plate_layouts(sample_info)
    if layout is None:
        return None, ["no layout.csv beside the plate exports: the profiles are not scored"]
    try:
        kinds = layout.pop("kind") if "kind" in layout.columns else None
        profiles = build_representations(dict(frames), sample_info, layout, corr_threshold=corr_threshold,
                                         sphere=sphere)
        subsets = None
        if kinds is not None:
            treated = layout.assign(kind=kinds)[~layout["control"]]
            subsets = {str(k): sorted(treated.loc[treated["kind"] == k, "treatment"].unique())
                       for k in treated["kind"].unique()}
        scores = {name: evaluate_profiles(p, null_size=null_size, seed=seed, subsets=subsets)
                  for name, p in profiles.items()}
    except Exception as err:  # auxiliary: never fail the profiles over their scores
        return None, [f"profile scoring skipped: {type(err).__name__}: {err}"]
    summary = {k: round(v["map_activity"], 3) for k, v in scores.items()}
    return (json_safe({"n_wells_with_layout": int(profiles["latents"].n_wells), "representations": scores}),
            [f"profiles scored against the layout (map_activity): {summary}"])


def _plate_layouts(sample_info: pd.DataFrame) -> pd.DataFrame | None:
    """The ``layout.csv`` of every plate folder that holds one, with its ``plate``; ``None`` when none does."""
    from .profiles import LAYOUT_FILE, read_layout

    layouts = []
    for plate, plate_dir in sample_info[["plate", "plate_dir"]].drop_duplicates().itertuples(index=False):
        if plate_dir and (Path(plate_dir) / LAYOUT_FILE).is_file():
            layouts.append(read_layout(Path(plate_dir) / LAYOUT_FILE).assign(plate=plate))
    return pd.concat(layouts, ignore_index=True) if layouts else None


@dataclass
class ProfiledWells:
    """Per-well profiles written by :func:`profile_wells`.

    Parameters
    ----------
    frames
        ``representation -> raw profiles`` (rows: samples).
    samples
        The wells profiled (every well with latents).
    sample_info
        ``sample``, ``plate``, ``well``, ``plate_dir`` of each well.
    scores
        :func:`score_profiles`'s scores, ``None`` when not scored.
    layout_digests
        ``plate folder -> digest of its layout.csv`` (:func:`file_digest`).
    messages
        What scoring said (a failure starts with ``"profile scoring skipped"``).
    seconds
        Wall-clock seconds of ``aggregate`` and ``score``.
    """

    frames: dict[str, pd.DataFrame]
    samples: list[str]
    sample_info: pd.DataFrame
    scores: dict[str, Any] | None
    layout_digests: dict[str, str]
    messages: list[str]
    seconds: dict[str, float]

    @property
    def missing(self) -> list[str]:
        """Wells without a latent profile."""
        return sorted(set(self.samples) - set(self.frames["latents"].index))

    @property
    def finite(self) -> bool:
        """Whether every latent profile is finite."""
        return bool(np.isfinite(self.frames["latents"].drop(columns="n_objects").to_numpy(np.float64)).all())

    def metrics(self) -> dict[str, float]:
        """``{"<representation>/<metric>": value}`` of the finite scores of :data:`PROFILE_METRICS`.

        Returns
        -------
        dict
            Empty when the profiles were not scored.
        """
        out: dict[str, float] = {}
        for rep, values in (self.scores or {}).get("representations", {}).items():
            for metric in PROFILE_METRICS:
                v = values.get(metric)
                if v is not None and np.isfinite(v):
                    out[f"{rep}/{metric}"] = float(v)
        return out


def profile_wells(
    latents_files: Mapping[str, str | Path],
    stats_files: Mapping[str, str | Path],
    summaries: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    **score_kwargs: Any,
) -> ProfiledWells:
    """Per-well profiles (median latent, median message-passed latent, graph statistics, arrangement), scored.

    The ``arrangement`` frame (:func:`phenocoder_lib.screen_evaluation.object_arrangement`) types every object
    by k-means on the latents, fitted on the control wells when a layout names them (else on every well),
    and summarizes each well's neighbourhood composition, co-occurrence and radial statistics. Profiles are
    scored where a layout is.

    Writes ``<representation>.parquet`` for each of :data:`RAW_REPRESENTATIONS` that has data,
    ``samples.parquet`` and, when scored, :data:`EVALUATION_FILE`.

    Parameters
    ----------
    latents_files
        ``sample -> latents.h5ad`` of every well, at least two.
    stats_files
        ``sample -> stats.h5ad`` of the wells with spatial statistics (rows not ``ok`` are left out).
    summaries
        ``sample -> sdata summary`` (``plate``, ``well``, ``plate_dir``) of the wells whose ``sdata`` is known.
    out_dir
        Folder to write (created).
    **score_kwargs
        Arguments of :func:`score_profiles` (``corr_threshold``, ``sphere``, ``null_size``, ``seed``).

    Returns
    -------
    ProfiledWells
        The profiles, the wells' plates and the scores.
    """
    import anndata as ad

    from .keys import MESSAGE_PASSING_LAYER, SPATIAL_KEY
    from .profiles import LAYOUT_FILE, aggregate_table
    from .screen_evaluation import object_arrangement

    seconds: dict[str, float] = {}
    raw: dict[str, list] = {name: [] for name in RAW_REPRESENTATIONS}
    objects: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    with _timed(seconds, "aggregate"):
        for path in latents_files.values():
            table = ad.read_h5ad(path)
            key = table.uns.get("phenocoder_latents", {}).get("sample_key", "sample")
            raw["latents"].append(aggregate_table(table, sample_key=key, prefix="latent:"))
            if SPATIAL_KEY in table.obsm:
                x = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
                objects.append((x, np.asarray(table.obsm[SPATIAL_KEY]), table.obs[key].astype(str).to_numpy()))
            if MESSAGE_PASSING_LAYER in table.layers:
                raw["latents_message_passing"].append(aggregate_table(table, layer=MESSAGE_PASSING_LAYER,
                                                                      sample_key=key, prefix="mp:"))
        for s, path in stats_files.items():
            stats = ad.read_h5ad(path)
            ok = (stats.obs["status"].astype(str) == "ok").to_numpy() if "status" in stats.obs else None
            stats = stats[ok] if ok is not None else stats
            if stats.n_obs:
                # median over the well's subunits, NaN where a statistic is missing in all of them (pandas
                # skips NaN without numpy's "All-NaN slice" warning for each such column)
                median = pd.DataFrame(np.asarray(stats.X, dtype=np.float64)).median(axis=0).to_numpy()
                raw["graph_stats"].append(pd.DataFrame(median[None], index=pd.Index([s], name="sample"),
                                                       columns=[str(v) for v in stats.var_names]))
    sample_info = pd.DataFrame([{"sample": s, **{k: str(summaries.get(s, {}).get(k, "")) for k in
                                                 ("plate", "well", "plate_dir")}} for s in latents_files])
    messages_arr: list[str] = []
    with _timed(seconds, "arrangement"):
        try:
            if objects:
                values, coords, groups = (np.concatenate(parts) for parts in zip(*objects, strict=True))
                raw["arrangement"].append(object_arrangement(values, coords, groups, _plate_layouts(sample_info),
                                                             sample_info, seed=int(score_kwargs.get("seed", 0))))
        except (ValueError, KeyError) as err:  # e.g. fewer objects than cell types: the other profiles stand
            messages_arr.append(f"arrangement features skipped: {type(err).__name__}: {err}")
    frames = {k: pd.concat(v) for k, v in raw.items() if v}
    with _timed(seconds, "score"):
        scores, messages = score_profiles(frames, sample_info, **score_kwargs)
    messages = messages_arr + messages
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_parquet(out_dir / f"{name}.parquet")
    sample_info.to_parquet(out_dir / "samples.parquet")
    if scores is not None:
        write_json_atomic(out_dir / EVALUATION_FILE, scores)
    layouts = {plate_dir: file_digest(Path(plate_dir) / LAYOUT_FILE)
               for plate_dir in sorted(set(sample_info["plate_dir"])) if plate_dir}
    return ProfiledWells(frames=frames, samples=list(latents_files), sample_info=sample_info, scores=scores,
                         layout_digests=layouts, messages=messages, seconds=seconds)


def warm_up_kernels(*, n_objects: int = 400, seed: int = 0) -> dict[str, float]:
    """Compile the numba kernels of the later stages now, on a small random well, and say how long each took.

    Every process compiles (or loads from numba's on-disk cache, after the first run after installation)
    the kernels of message passing (``latents``), the spatial statistics (``graph_stats``) and the
    neighbour graph and UMAP (``embedding``, :func:`phenocoder_lib.embedding.warm_up`) when they are first
    called. Calling this early, e.g. in a background thread while the model trains (``phenocoder demo``),
    takes that time off the critical path; the results of the stages are unchanged. It warns about nothing
    and touches no global setting (the warnings filters included), so it is safe in a thread.

    Parameters
    ----------
    n_objects
        Objects of the random well (3-D positions at about the demo's density, four clusters, eight float32
        latent dimensions: the dtypes of a real latents table).
    seed
        Seed of the random well.

    Returns
    -------
    Seconds per part: ``message_passing``, ``graph_stats``, ``embedding``.

    """
    import anndata as ad

    from .embedding import warm_up
    from .message_passing import spatial_message_passing
    from .spatial import compute_spatial_stats

    n = check_int(n_objects, argument="n_objects", minimum=50)
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0, (n * 2000.0) ** (1 / 3), size=(n, 3))
    x = rng.normal(size=(n, 8)).astype(np.float32)
    seconds = {}
    t = time.perf_counter()
    spatial_message_passing(coords, x, 25.0)
    seconds["message_passing"] = time.perf_counter() - t
    obs = pd.DataFrame({"sample": pd.Categorical(["warm_up"] * n),
                        "cluster": pd.Categorical(rng.integers(0, 4, n).astype(str), categories=list("0123"))},
                       index=pd.RangeIndex(n).astype(str))
    table = ad.AnnData(X=x, obs=obs, obsm={"spatial": coords})
    t = time.perf_counter()
    compute_spatial_stats(table, sample_key="sample", cluster_key="cluster", radii=(25, 50), progress=False)
    seconds["graph_stats"] = time.perf_counter() - t
    seconds["embedding"] = warm_up(seed=seed)
    return seconds


def kernels_cached() -> bool:
    """Whether numba's on-disk cache holds the kernels that :func:`warm_up_kernels` compiles.

    Message passing and the spatial statistics run numba kernels compiled with ``cache=True``: the first
    process after installation (or after a change of their source) compiles them, about 20 s of CPU; later
    processes load them. ``False`` when an index file of one of them is missing (or numba's cache is not
    laid out as expected), so that a caller can compile them ahead, e.g. in a child process
    (``phenocoder demo``). An index that exists but is stale counts as cached; numba then recompiles on first
    call, as it would anyway.

    Returns
    -------
    bool
    """
    import os

    from .message_passing import _neighbourhood_mean
    from .spatial import _kernels as k

    for kernel in (_neighbourhood_mean, k.label_pass, k.group_closeness_sums, k.local_clustering, k.kcore,
                   k.components, k.moran_numerators):
        index = getattr(getattr(getattr(kernel, "_cache", None), "_cache_file", None), "_index_path", None)
        if not (index and os.path.exists(index)):
            return False
    return True


__all__ += [  # the per-well stages
    "POOLED_LABELS_FILE", "REFERENCE_FILE", "IngestedWell", "ProfiledWells", "ReferenceClustering", "WellEmbedding",
    "WellGraphStats", "WellLabels", "WellPatches", "array_digest", "build_cluster_reference", "cluster_column",
    "content_digest", "embed_wells", "extract_patches", "file_digest", "ingest_well", "interaction_matrix",
    "label_well", "object_label_ids", "planted_truth_objects", "profile_wells", "score_profiles", "well_colours",
    "well_graph_stats", "warm_up_kernels", "kernels_cached",
]
