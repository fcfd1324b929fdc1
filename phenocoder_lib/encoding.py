"""Deterministic encoding of every object into the latent space.

Latents are the encoder's ``z_mean`` (never a sample of ``z``), so encoding is a pure function of the
model, the images and the dataset's normalization: two calls give identical latents.

Where the patches come from, per sample:

- from a stored patch dataset of the model (``<data_dir>/<dataset>/``) when it holds every object of the
  sample at the same pixel index and its settings equal the ones the model was trained with (no image
  read at all);
- otherwise they are cut from the SpatialData image on the fly, one z-plane at a time, with the same
  geometry (patch size, centring, border padding) as :func:`phenocoder_lib.patches.generate_dataset`.

Normalization is always the one recorded with the training datasets: a sample of a training dataset
uses that dataset's anchors; with per-sample anchors, a sample never seen in training gets anchors
computed from its own patches (same percentile rule); with global anchors it reuses the first training
dataset's global anchors. Memory is bounded: patches are processed in blocks of ``batch_size`` rows
(plus one z-plane of the image).

Conditions: :mod:`phenocoder_lib.conditions` (:class:`ConditionEncoder` and :func:`condition_frame`
are re-exported here).

Importing this module does not import TensorFlow.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._grouping import group_rows
from .conditions import ConditionEncoder, condition_frame
from .keys import INSTANCE_KEY, LATENT_PREFIX, MESSAGE_PASSING_LAYER, REGION_KEY
from .validation import check_int, check_key, check_no_missing, check_obsm, check_positive, check_unique_obs_names
from .warnings import UnseenConditionWarning

logger = logging.getLogger(__name__)

__all__ = [
    "ConditionEncoder",
    "UnseenConditionWarning",
    "condition_frame",
    "encode_sample",
    "encode_table",
]

#: Raw patches of one unseen sample kept in memory for its anchors before falling back to two passes.
_KEEP_RAW_BYTES = 512 * 2**20


# --------------------------------------------------------------------------------------------------
# Patches for encoding
# --------------------------------------------------------------------------------------------------


@dataclass
class _SampleSource:
    """How the patches of one sample are obtained and normalized."""

    sample: str
    dataset: str | None  # training dataset that holds the sample (condition value), else None
    store: Path | None  # dataset folder to read stored patches from, else None (extract from the image)
    store_rows: np.ndarray | None  # store row of each object (in table order) when reading from the store
    store_padded: np.ndarray | None  # padded flag of each object in the store
    anchors: dict[str, list] | None  # None: to be computed from the sample's own patches
    anchor_source: str


def _same_settings(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    keys = ("patch_size", "channels", "normalization", "spatial_key_index", "samples", "store_dtype")
    return all(json.dumps(a.get(k), sort_keys=True) == json.dumps(b.get(k), sort_keys=True) for k in keys)


def _stored_index(folder: Path) -> tuple[dict, dict[str, pd.DataFrame]] | None:
    """Return (settings, {sample: index rows by obs_name}) of a dataset folder (cached while unchanged)."""
    from . import patches as P

    try:
        stamp = tuple((folder / f).stat().st_mtime_ns for f in (P.SETTINGS_FILE, P.INDEX_FILE))
    except OSError:
        return None
    return _stored_index_cached(str(folder), stamp)


@functools.lru_cache(maxsize=8)
def _stored_index_cached(folder: str, stamp: tuple) -> tuple[dict, dict[str, pd.DataFrame]] | None:
    from . import patches as P

    try:
        ds = P.PatchDataset.open(folder)
    except (FileNotFoundError, ValueError):
        return None
    by_sample = {str(k): g.set_index("obs_name") for k, g in ds.index.groupby("sample", sort=False)}
    return ds.settings, by_sample


def _plan_sample(
    sample: str,
    obs_names: np.ndarray,
    index: np.ndarray,
    *,
    dataset_settings: Mapping[str, Mapping[str, Any]],
    data_dir: Path | None,
    use_store: bool,
) -> _SampleSource:

    names = list(dataset_settings)
    holder = next((n for n in names if sample in dataset_settings[n]["samples"]), None)
    settings = dataset_settings[holder] if holder is not None else dataset_settings[names[0]]
    norm = settings["normalization"]
    if not norm["scale"]:
        anchors, source = None, "none (scale=False)"
    elif norm["scale_per_sample"]:
        if holder is not None:
            anchors, source = norm["per_sample"][sample], f"dataset {holder!r}"
        else:
            anchors, source = None, "computed from the sample's own patches"
    else:
        anchors, source = norm["global"], f"global anchors of dataset {holder or names[0]!r}"
    store, rows, padded = None, None, None
    if use_store and holder is not None and data_dir is not None:
        folder = Path(data_dir) / holder
        stored = _stored_index(folder)
        if stored is not None and _same_settings(stored[0], settings) and sample in stored[1]:
            sub = stored[1][sample]
            if sub.index.is_unique and pd.Index(obs_names).isin(sub.index).all():
                sub = sub.loc[obs_names]
                stored_idx = sub[["y", "x", "z"]].to_numpy()[:, : index.shape[1]]
                if np.array_equal(stored_idx, index):
                    store, rows, padded = folder, sub["row"].to_numpy(np.int64), sub["padded"].to_numpy(bool)
    return _SampleSource(sample, holder, store, rows, padded, anchors, source)


def _iter_raw(
    sdata: Any,
    src: _SampleSource,
    index: np.ndarray,
    *,
    image_key: str,
    settings: Mapping[str, Any],
    block: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (positions into the sample's objects, raw patches (n, h, w, c), padded) in bounded blocks."""
    from . import patches as P

    patch_size = tuple(settings["patch_size"])
    store_dtype = np.dtype(settings["store_dtype"])
    if src.store is not None:
        import zarr

        arr = zarr.open_array(src.store / P.STORE_DIR / src.sample, mode="r")
        order = np.argsort(src.store_rows, kind="stable")  # read the store sequentially
        sorted_rows = src.store_rows[order]
        for start in range(0, len(order), block):
            pos = order[start:start + block]
            r = sorted_rows[start:start + block]
            lo, hi = int(r[0]), int(r[-1]) + 1
            raw = arr[lo:hi][r - lo] if hi - lo <= 4 * len(r) else arr.get_orthogonal_selection((r,))
            yield pos, raw, np.zeros(len(pos), bool)  # padded flags come from the index (see caller)
        return
    image, channels, is_3d = P.image_array(sdata, f"{image_key}_{src.sample}")
    if channels != list(settings["channels"]):
        raise ValueError(
            f"sample {src.sample!r} has channels {channels}; the model was trained on {settings['channels']}."
        )
    if not is_3d:
        plane = np.asarray(image)
        for start in range(0, len(index), block):
            pos = np.arange(start, min(start + block, len(index)))
            patches, padded = P.patch_windows(plane, index[pos, 0], index[pos, 1], patch_size)
            yield pos, patches.astype(store_dtype, copy=False), padded
        return
    for pos, patches, padded in P.iter_patches(image, index, patch_size, is_3d):
        for start in range(0, len(pos), block):
            sl = slice(start, start + block)
            yield pos[sl], patches[sl].astype(store_dtype, copy=False), padded[sl]


def _sample_index(
    sdata: Any, table: Any, rows: np.ndarray, sample: str, *, settings: Mapping[str, Any], image_key: str
) -> np.ndarray:
    from . import patches as P

    key = settings["spatial_key_index"]
    index_all = check_obsm(table, key, argument="spatial_key_index", n_cols=(2, 3))
    image, _, is_3d = P.image_array(sdata, f"{image_key}_{sample}")
    return P.validate_index(np.asarray(index_all[rows]), image_shape=image.shape, is_3d=is_3d, key=key,
                            sample=sample, obs_names=table.obs_names[rows])


def _prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, ``depth`` items ahead.

    Reading and normalizing the next block (numpy, zarr, dask release the GIL) overlaps the forward
    pass of the current one (TensorFlow releases it too); memory stays bounded by ``depth`` blocks.
    """
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as err:  # re-raised in the consumer
            q.put(("error", err))

    thread = threading.Thread(target=work, name="phenocoder-encode-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)


class _Encoder:
    """``z_mean`` of normalized patches in batches (one compiled forward function per model)."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = int(batch_size)

    def __call__(self, x: np.ndarray, cond: np.ndarray | None) -> np.ndarray:
        inputs = [x, cond] if self.model.conditional else x
        z_mean, _ = self.model.encoder.predict_on_batch(inputs)
        return np.asarray(z_mean, np.float32)


def encode_sample(
    model: Any,
    sdata: Any,
    sample: str,
    *,
    model_config: Mapping[str, Any],
    table_key: str,
    sample_key: str,
    image_key: str,
    batch_size: int = 512,
    data_dir: str | Path | None = None,
    use_store: bool = True,
    conditions: ConditionEncoder | None = None,
    rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Encode every object of one sample (pure: reads ``sdata`` and the dataset store, writes nothing).

    Parameters
    ----------
    model
        A trained :class:`~phenocoder_lib.models.CVAE` / ``CondCVAE``.
    sdata
        SpatialData with ``tables[table_key]`` and ``images[f"{image_key}_{sample}"]``.
    sample
        Value of ``.obs[sample_key]``.
    table_key, sample_key, image_key
        Where the objects and images are: ``sdata.tables[table_key]``, ``.obs[sample_key]``,
        ``sdata.images[f"{image_key}_{sample}"]``.
    model_config
        The model's configuration (``model_config.json``): ``dataset_settings`` (patch geometry and
        normalization of each training dataset) and the condition encoding.
    batch_size
        Patches per forward pass (and per block read), which bounds memory.
    data_dir
        Folder of the training datasets; stored patches are read from there when they cover the sample.
    use_store
        Set False to always cut patches from the images.
    conditions
        The model's condition encoding (``None`` for a plain CVAE).
    rows
        Positions of the sample's objects in the table, ascending, when the caller knows them already
        (:func:`encode_table` groups the table once, so a plate costs O(objects), not O(objects x wells)).

    Returns
    -------
    dict
        ``rows`` (positions in the table), ``latents`` ((n, L) float32, ``z_mean``), ``padded``
        ((n,) bool), ``anchors``, ``anchor_source``, ``patch_source``, ``dataset`` and
        ``conditions_report``.

    """
    from . import patches as P

    table = sdata.tables[table_key]
    if rows is None:
        rows = np.flatnonzero(table.obs[sample_key].astype(str).to_numpy() == str(sample))
    if not len(rows):
        raise ValueError(f"sample {sample!r} has no objects in table {table_key!r} (column {sample_key!r}).")
    dataset_settings = model_config["dataset_settings"]
    first = dataset_settings[next(iter(dataset_settings))]
    index = _sample_index(sdata, table, rows, str(sample), settings=first, image_key=image_key)
    obs_names = table.obs_names[rows].astype(str).to_numpy()
    src = _plan_sample(str(sample), obs_names, index, dataset_settings=dataset_settings,
                       data_dir=Path(data_dir) if data_dir is not None else None, use_store=use_store)
    settings = dataset_settings[src.dataset] if src.dataset is not None else first
    norm = settings["normalization"]
    n = len(rows)
    padded = src.store_padded.copy() if src.store_padded is not None else np.zeros(n, bool)

    cond = None
    report: dict = {}
    if conditions is not None and conditions.columns:
        frame = _encode_condition_frame(conditions.columns, table, rows, index, sample=str(sample),
                                        dataset=src.dataset, sample_key=sample_key)
        cond, report = conditions.transform(frame, where=f" of sample {sample!r}")

    block = max(int(batch_size), 1)
    blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]
    anchors = src.anchors
    if norm["scale"] and anchors is None:
        # A sample never seen in training, per-sample mode: anchors from its own patches first.
        acc = None
        kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = []
        kept_bytes = 0
        for item in _iter_raw(sdata, src, index, image_key=image_key, settings=settings, block=block):
            if acc is None:
                acc = P.IntensityAccumulator(item[1].shape[-1], item[1].dtype)
            acc.add(item[1])
            if kept is not None:
                kept.append(item)
                kept_bytes += item[1].nbytes
                if kept_bytes > _KEEP_RAW_BYTES:
                    kept = None  # too large to keep: cut the patches again in a second pass
        assert acc is not None
        anchors = P.anchors_from(acc, norm["scale_percentile"], settings["channels"], f"sample {sample!r}")
        blocks = iter(kept) if kept is not None else _iter_raw(
            sdata, src, index, image_key=image_key, settings=settings, block=block)
    else:
        blocks = _iter_raw(sdata, src, index, image_key=image_key, settings=settings, block=block)

    fallback = anchors if (norm["scale"] and norm["scale_per_sample"] and src.dataset is None) else None
    encoder = _Encoder(model, block)
    latents = np.empty((n, model.n_latent_dim), np.float32)
    normalized = ((pos, P.normalize_for(raw, settings, str(sample), fallback), pad) for pos, raw, pad in blocks)
    for pos, x, pad in _prefetched(normalized):
        latents[pos] = encoder(x, cond[pos] if cond is not None else None)
        if src.store is None:
            padded[pos] = pad
    return {
        "rows": rows,
        "latents": latents,
        "padded": padded,
        "anchors": anchors,
        "anchor_source": src.anchor_source,
        "patch_source": "dataset store" if src.store is not None else "image",
        "dataset": src.dataset,
        "conditions_report": report,
    }


def _encode_condition_frame(
    columns: Sequence[str], table: Any, rows: np.ndarray, index: np.ndarray, *, sample: str,
    dataset: str | None, sample_key: str,
) -> pd.DataFrame:
    """Condition values of a sample's objects at inference (the counterpart of :func:`condition_frame`)."""
    out = pd.DataFrame(index=np.arange(len(rows)))
    obs = table.obs
    for col in columns:
        # Same precedence as at training (condition_frame): the patch index's own columns first.
        if col == "dataset":
            out[col] = dataset if dataset is not None else "<not in any training dataset>"
        elif col in ("sample", sample_key):
            out[col] = sample
        elif col in ("y", "x", "z"):
            j = "yxz".index(col)
            out[col] = index[:, j] if j < index.shape[1] else 0
        elif col in obs.columns:
            out[col] = obs[col].to_numpy()[rows]
        else:
            raise KeyError(
                f"condition {col!r} of the model is not a column of the table's .obs; add it before encoding."
            )
    return out


# --------------------------------------------------------------------------------------------------
# Whole table
# --------------------------------------------------------------------------------------------------


def encode_table(
    model: Any,
    sdata: Any,
    *,
    model_config: Mapping[str, Any],
    table_key: str,
    sample_key: str,
    image_key: str,
    spatial_key: str = "spatial",
    batch_size: int = 512,
    spatial_message_passing_radius: float | None = None,
    data_dir: str | Path | None = None,
    samples: Sequence[str] | None = None,
    use_store: bool = True,
    progress: bool = False,
) -> Any:
    """Encode every object of ``sdata.tables[table_key]`` (or of ``samples``) into a new table.

    Parameters
    ----------
    model
        A trained :class:`~phenocoder_lib.models.CVAE` / ``CondCVAE``.
    sdata
        SpatialData with the table and the images ``f"{image_key}_{sample}"``.
    model_config
        The model's configuration (``model_config.json``): dataset settings and condition encoding.
    table_key
        The per-object table.
    sample_key
        Its sample column (no missing values).
    image_key
        Prefix of the image names.
    spatial_key
        ``.obsm`` key of the coordinates for message passing.
    batch_size
        Patches per forward pass (a positive int); bounds memory.
    spatial_message_passing_radius
        When given (>= 0, units of ``.obsm[spatial_key]``), also compute the message-passed layer.
    data_dir
        Folder of the training datasets; stored patches are read from there when they cover a sample.
    samples
        Encode only these samples (default: all).
    use_store
        Set False to always cut patches from the images.
    progress
        Show a progress bar.

    Returns
    -------
    anndata.AnnData
        Parsed with ``spatialdata.models.TableModel`` (keeping the source table's region/instance
        link), one row per object in the source table's order:

        - ``.X``: ``z_mean`` latents, float32, variables ``phc_latent_1 ... phc_latent_L``;
        - ``.obs``: the source ``.obs`` plus ``phc_padded`` (the patch crossed the image border and
          was padded); ``.obsm``: the source ``.obsm``;
        - ``.layers['spatial_message_passing']`` when ``spatial_message_passing_radius`` is given: the
          mean latent over each object and its neighbours within the radius (inclusive), per sample;
        - ``.uns['phenocoder']``: model name, version, dataset settings, and per sample the patch
          source, the anchors used and any unseen condition values.

    Raises
    ------
    KeyError
        For an unknown table, sample column or sample.
    ValueError
        For invalid arguments, duplicate object names or objects without a sample.

    """
    table = _checked_table(sdata, table_key=table_key, sample_key=sample_key, spatial_key=spatial_key,
                           batch_size=batch_size, radius=spatial_message_passing_radius)
    sample_col = table.obs[sample_key].astype(str)
    chosen = _chosen_samples(sample_col, samples, sample_key=sample_key)
    selected = np.flatnonzero(sample_col.isin(chosen).to_numpy())
    latents, padded, per_sample = _encode_samples(
        model, sdata, table, sample_col, chosen, selected, model_config=model_config, table_key=table_key,
        sample_key=sample_key, image_key=image_key, batch_size=batch_size, data_dir=data_dir, use_store=use_store,
        progress=progress)
    out = _latent_table(table, selected, latents, padded, n_latent_dim=model.n_latent_dim)
    if spatial_message_passing_radius is not None:
        from .message_passing import spatial_message_passing

        out.layers[MESSAGE_PASSING_LAYER] = spatial_message_passing(
            np.asarray(out.obsm[spatial_key]), latents, float(spatial_message_passing_radius),
            samples=out.obs[sample_key].astype(str).to_numpy(),
        )
    out.uns["phenocoder"] = _encoding_info(model, model_config, table_key=table_key, spatial_key=spatial_key,
                                           radius=spatial_message_passing_radius, per_sample=per_sample)
    return _linked_to_labels(out, table, table_key=table_key)


def _checked_table(sdata: Any, *, table_key: str, sample_key: str, spatial_key: str, batch_size: int,
                   radius: float | None) -> Any:
    """Return the table to encode after checking the arguments against it."""
    check_key(sdata.tables, table_key, argument="table_key", what="table of the SpatialData object",
              fix="Pass the name of the per-object table (read_plate(table_key=...) names it).")
    table = sdata.tables[table_key]
    check_unique_obs_names(table, argument=f"table_key={table_key!r}")
    check_no_missing(table.obs, sample_key, argument="sample_key")
    if radius is not None:
        check_obsm(table, spatial_key, argument="spatial_key")
        check_positive(radius, argument="spatial_message_passing_radius", allow_zero=True,
                       unit=f"units of .obsm[{spatial_key!r}]")
    check_int(batch_size, argument="batch_size", minimum=1, expected="a positive int")
    return table


def _chosen_samples(sample_col: pd.Series, samples: Sequence[str] | None, *, sample_key: str) -> list[str]:
    """Return the samples to encode: all, in order of first appearance, or the requested ones."""
    all_samples = list(pd.unique(sample_col.to_numpy()))
    if samples is None:
        return all_samples
    chosen = [str(s) for s in samples]
    unknown = [s for s in chosen if s not in all_samples]
    if unknown:
        raise KeyError(f"samples={unknown} are not in .obs[{sample_key!r}]; available: {all_samples[:12]}.")
    return chosen


def _encode_samples(model: Any, sdata: Any, table: Any, sample_col: pd.Series, chosen: list[str],
                    selected: np.ndarray, *, model_config: Mapping[str, Any], table_key: str, sample_key: str,
                    image_key: str, batch_size: int, data_dir: str | Path | None, use_store: bool,
                    progress: bool) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Encode each chosen sample; return latents and padded flags of the selected rows, and per-sample info."""
    from tqdm.auto import tqdm

    cond_enc = None
    if model_config.get("conditions_encoder"):
        cond_enc = ConditionEncoder.from_dict(model_config["conditions_encoder"])
    position = np.full(table.n_obs, -1, np.int64)
    position[selected] = np.arange(len(selected))
    latents = np.empty((len(selected), model.n_latent_dim), np.float32)
    padded = np.zeros(len(selected), bool)
    per_sample: dict[str, Any] = {}
    rows_of = dict(zip(*group_rows(sample_col.to_numpy()), strict=True))  # each sample's rows, in one pass
    for sample in tqdm(chosen, desc="Encoding samples", disable=not progress):
        res = encode_sample(model, sdata, sample, model_config=model_config, table_key=table_key,
                            sample_key=sample_key, image_key=image_key, batch_size=batch_size,
                            data_dir=data_dir, use_store=use_store, conditions=cond_enc, rows=rows_of[sample])
        latents[position[res["rows"]]] = res["latents"]
        padded[position[res["rows"]]] = res["padded"]
        info = {"n_objects": len(res["rows"]), "n_padded": int(res["padded"].sum()),
                "patch_source": res["patch_source"], "anchor_source": res["anchor_source"]}
        if res["anchors"] is not None:
            info["anchors"] = res["anchors"]
        if res["conditions_report"]:
            info["unseen_conditions"] = json.dumps(res["conditions_report"], sort_keys=True)
        per_sample[sample] = info
        logger.info("sample %s: %d objects encoded (%s, anchors: %s)", sample, len(res["rows"]),
                    res["patch_source"], res["anchor_source"])
    return latents, padded, per_sample


def _latent_table(table: Any, selected: np.ndarray, latents: np.ndarray, padded: np.ndarray, *,
                  n_latent_dim: int) -> Any:
    """Return the AnnData of the latents with the source rows' ``.obs`` (plus ``phc_padded``) and ``.obsm``."""
    import anndata as ad

    source = table[selected] if len(selected) != table.n_obs else table
    obs = source.obs.copy()
    obs["phc_padded"] = padded
    out = ad.AnnData(X=latents, obs=obs)
    out.var_names = [f"{LATENT_PREFIX}{i + 1}" for i in range(n_latent_dim)]
    for key, value in source.obsm.items():
        out.obsm[key] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value.copy()
    return out


def _encoding_info(model: Any, model_config: Mapping[str, Any], *, table_key: str, spatial_key: str,
                   radius: float | None, per_sample: dict[str, Any]) -> dict[str, Any]:
    """Return ``.uns['phenocoder']``: model, dataset settings and, per sample, where patches and anchors came from."""
    first = model_config["dataset_settings"][next(iter(model_config["dataset_settings"]))]
    return {
        "model_name": str(model_config.get("model_name", "")),
        "model_class": type(model).__name__,
        "phenocoder_version": _version(),
        "source_table": table_key,
        "latent": "z_mean",
        "n_latent_dim": int(model.n_latent_dim),
        "conditions": list(model_config.get("conditions", [])),
        "datasets": list(model_config["dataset_settings"]),
        "patch_size": list(first["patch_size"]),
        "channels": list(first["channels"]),
        "spatial_key_index": first["spatial_key_index"],
        "normalization": {k: first["normalization"][k] for k in ("scale", "scale_per_sample", "scale_percentile")},
        "spatial_message_passing_radius": float(radius) if radius is not None else "none",
        "spatial_key": spatial_key,
        "samples": per_sample,
    }


def _linked_to_labels(out: Any, table: Any, *, table_key: str) -> Any:
    """Return ``out`` parsed as a SpatialData table, linked to the source table's labels when it was."""
    from spatialdata.models import TableModel

    attrs = dict(table.uns.get(TableModel.ATTRS_KEY, {}) or {})
    region = attrs.get(TableModel.REGION_KEY)
    region_key = attrs.get(TableModel.REGION_KEY_KEY)
    instance_key = attrs.get(TableModel.INSTANCE_KEY)
    if region is not None and region_key in out.obs and instance_key in out.obs:
        present = out.obs[region_key].astype(str).unique().tolist()
        region = [r for r in np.atleast_1d(region).tolist() if r in present] or region
        if isinstance(region, list) and len(region) == 1:
            region = region[0]
        return TableModel.parse(out, region=region, region_key=region_key, instance_key=instance_key,
                                overwrite_metadata=True)
    if REGION_KEY in out.obs and INSTANCE_KEY in out.obs:
        logger.warning("table %r has no spatialdata region attributes; the encoded table is not linked to labels.",
                       table_key)
    return TableModel.parse(out)


def _version() -> str:
    from . import __version__

    return __version__
