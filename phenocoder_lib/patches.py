"""Patch datasets: vectorized extraction, intensity anchors, normalization, chunked storage.

A patch is the 2-D multi-channel window of ``patch_size = (height, width)`` pixels centred on an
object's integer index (y, x) in its z-plane: rows ``y - height // 2 ... y - height // 2 + height - 1``,
so the object sits at pixel ``(height // 2, width // 2)`` for odd and even sizes alike. Windows that
cross the image border are padded with the plane's per-channel minimum (its background level) and
flagged ``padded`` in the index; every object gets a patch.

Extraction reads one (channel, y, x) plane at a time from the (lazy) image and gathers all windows of
the objects in that plane with one fancy-indexing call on a sliding-window view, so memory is bounded
by one plane plus one write buffer, never a whole stack. Samples are processed and written one at a
time: the table is grouped by sample once, and each sample's index rows go to ``index.parquet`` as
soon as its patches are stored (at most one Parquet row group is buffered), so besides the returned
index only a few bytes per object (row positions) are held for the whole table.

Storage (``<dir_dataset>/<dataset>/``):

``patches.zarr/<sample>``
    raw patches, shape (n, height, width, channels), the image's own dtype (float64 becomes float32),
    zarr v3, zstd-compressed, chunked along n; rows are in z-plane order (see ``row`` in the index);
``index.parquet``
    one row per patch: ``obs_name``, ``sample``, ``y``, ``x``, ``z``, ``row``, ``padded``,
    ``dataset`` and the requested ``metadata_keys``;
``stats.parquet``
    per (sample, channel) intensity statistics of the patch pixels (mean, std, median, mad, min,
    max, percentile_low, percentile_high, n_pixels);
``settings.json``
    patch size, channels, dtype, keys, and the normalization (mode, percentile and the anchors),
    so that training and encoding normalize identically.

Normalization: ``(v - low[c]) / (high[c] - low[c])`` clipped to [0, 1] and cast to float32, applied
when patches are read. ``low`` is the ``scale_percentile`` percentile of all patch pixels (the
background level); ``high`` is the ``100 - scale_percentile`` percentile of the *foreground* patch
pixels, those brighter than the channel's median. Microscopy patches are mostly background, so
an upper percentile over all pixels (of the patches or of whole image slices) lands at the edge of
the foreground and saturates most of every nucleus; foreground percentiles saturate only
``scale_percentile`` % of the foreground.
A channel whose upper percentile equals its lower one falls back to its maximum, and a constant
channel gets ``high = low + 1`` and a warning. With ``scale_per_sample=True`` each sample has its
own anchors (a sample never seen before gets anchors computed from its own patches); otherwise one set of
anchors is pooled over all samples and reused for new samples.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._grouping import group_rows
from .io import atomic_dir, write_json_atomic
from .validation import (
    check_in_range,
    check_int_pair,
    check_key,
    check_no_missing,
    check_obs_column,
    check_obsm,
    check_unique_obs_names,
)
from .warnings import ConstantChannelWarning

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
INDEX_FILE = "index.parquet"
STATS_FILE = "stats.parquet"
STORE_DIR = "patches.zarr"
_RESERVOIR = 200_000  # float images: pixels kept per channel and sample for the percentiles
_CHUNK_ROWS = 1024
_GATHER_BYTES = 16 * 2**20  # patch_windows gathers windows in blocks of this size
_HIST_ROWS = 2**20  # IntensityAccumulator counts integer pixels in blocks of this many (8 B each as int64)
_ROW_GROUP = 1024 * 1024  # pyarrow's default largest row group (the one DataFrame.to_parquet writes)
_READ_ROWS = 16384  # PatchDataset.open decodes the index in batches of this many rows


# --------------------------------------------------------------------------------------------------
# Image access
# --------------------------------------------------------------------------------------------------


def image_array(sdata: Any, key: str) -> tuple[Any, list[str], bool]:
    """Return an image's pixel array with its axes in (c, [z,] y, x) order, its channel names and whether it is 3-D.

    Multiscale images use their full-resolution level.

    Parameters
    ----------
    sdata
        The SpatialData object.
    key
        Name of the image in ``sdata.images``.

    Returns
    -------
    array : dask.array.Array or numpy.ndarray
        The pixels, dims (c, z, y, x) for 3-D images or (c, y, x) for 2-D ones, in the image's dtype.
    channels : list of str
        Channel names (the ``c`` coordinate, or ``"0"``, ``"1"``, ... when it has none).
    is_3d : bool
        Whether the image has a ``z`` axis.

    Raises
    ------
    KeyError
        ``key`` is not an image of ``sdata``.
    ValueError
        The image's axes are not c, (z,) y, x.
    """
    check_key(sdata.images, key, argument="image key", what="image of the SpatialData object",
              fix="Images must be stored as f'{image_key}_{sample}'; check image_key and the sample ids.")
    element = sdata.images[key]
    if not hasattr(element, "dims"):  # DataTree (multiscale)
        from spatialdata import get_pyramid_levels

        element = get_pyramid_levels(element, n=0)
    dims = tuple(element.dims)
    is_3d = "z" in dims
    order = ("c", "z", "y", "x") if is_3d else ("c", "y", "x")
    if set(dims) != set(order):
        raise ValueError(
            f"image {key!r} has dims {dims}; expected {order}. Parse it with spatialdata.models.Image3DModel or "
            "Image2DModel and name its axes c, (z,) y, x."
        )
    element = element.transpose(*order)
    channels = [str(c) for c in element.coords["c"].values] if "c" in element.coords else \
        [str(i) for i in range(element.sizes["c"])]
    return element.data, channels, is_3d


def patch_windows(
    plane: np.ndarray, ys: np.ndarray, xs: np.ndarray, patch_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Cut windows of ``patch_size`` centred on (ys, xs) from one (c, y, x) plane.

    Windows crossing the border are padded with the per-channel minimum of the plane.

    Parameters
    ----------
    plane
        One z-plane, shape (c, y, x).
    ys, xs
        Integer pixel positions of the window centres, shape (n,) each.
    patch_size
        (height, width) of the windows.

    Returns
    -------
    patches : numpy.ndarray
        Shape (n, height, width, c), in the plane's dtype.
    padded : numpy.ndarray
        Boolean, shape (n,): whether a window crosses the border.
    """
    h, w = patch_size
    n_c, height, width = plane.shape
    top, left = h // 2, w // 2
    padded_plane = np.empty((n_c, height + h - 1, width + w - 1), dtype=plane.dtype)
    fill = plane.reshape(n_c, -1).min(axis=1)
    padded_plane[...] = fill[:, None, None]
    padded_plane[:, top:top + height, left:left + width] = plane
    view = np.lib.stride_tricks.sliding_window_view(padded_plane, (h, w), axis=(1, 2))  # (c, Y, X, h, w)
    # gathered in blocks straight into the (n, h, w, c) output: one copy of the patches, not a (c, n, h, w)
    # gather plus its transposed copy
    patches = np.empty((len(ys), h, w, n_c), dtype=plane.dtype)
    step = max(1, _GATHER_BYTES // max(h * w * n_c * plane.dtype.itemsize, 1))
    for i in range(0, len(ys), step):
        patches[i:i + step] = view[:, ys[i:i + step], xs[i:i + step]].transpose(1, 2, 3, 0)
    padded = (ys - top < 0) | (xs - left < 0) | (ys - top + h > height) | (xs - left + w > width)
    return patches, padded


def iter_patches(
    image: Any, index: np.ndarray, patch_size: tuple[int, int], is_3d: bool, *, max_bytes: int = 256 * 2**20
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield the patches of the objects at integer ``index`` (y, x[, z]), one z-plane at a time.

    Planes are visited in increasing z. Consecutive planes are read together (in parallel by dask) up
    to ``max_bytes`` of image data at a time.

    Parameters
    ----------
    image
        Pixel array with dims (c, z, y, x) or (c, y, x) (see :func:`image_array`).
    index
        Integer positions, shape (n, 3) as (y, x, z) for 3-D images or (n, 2) as (y, x) for 2-D ones.
    patch_size
        (height, width) of the patches.
    is_3d
        Whether ``image`` has a z axis.
    max_bytes
        Most image bytes read at once.

    Yields
    ------
    positions : numpy.ndarray
        Row numbers into ``index`` of this plane's objects.
    patches : numpy.ndarray
        Their patches, shape (len(positions), height, width, c).
    padded : numpy.ndarray
        Boolean flags of the patches that cross the image border.
    """
    if not is_3d:
        if len(index):
            plane = np.asarray(image)
            patches, padded = patch_windows(plane, index[:, 0], index[:, 1], patch_size)
            yield np.arange(len(index)), patches, padded
        return
    z = index[:, 2]
    order = np.argsort(z, kind="stable")
    bounds = np.flatnonzero(np.diff(z[order])) + 1
    blocks = [b for b in np.split(order, bounds) if len(b)]
    plane_bytes = int(np.prod(image.shape[:1] + image.shape[2:])) * np.dtype(image.dtype).itemsize
    per_read = max(1, max_bytes // max(plane_bytes, 1))
    for start in range(0, len(blocks), per_read):
        group = blocks[start:start + per_read]
        z_values = [int(z[b[0]]) for b in group]
        z0, z1 = z_values[0], z_values[-1] + 1
        stack = np.asarray(image[:, z0:z1])  # (c, z1 - z0, y, x): one dask compute per group
        for block, zv in zip(group, z_values, strict=True):
            patches, padded = patch_windows(stack[:, zv - z0], index[block, 0], index[block, 1], patch_size)
            yield block, patches, padded


def validate_index(
    index: np.ndarray, *, image_shape: tuple[int, ...], is_3d: bool, key: str, sample: Any, obs_names: Sequence[str]
) -> np.ndarray:
    """Check integer (y, x[, z]) pixel indices against an image and return them as int64.

    Parameters
    ----------
    index
        The objects' ``.obsm`` indices, shape (n, 2) or (n, 3).
    image_shape
        Shape of the image, (c, z, y, x) or (c, y, x).
    is_3d
        Whether the image has a z axis.
    key
        The ``.obsm`` key the indices come from, for the messages.
    sample
        The sample id, for the messages.
    obs_names
        The objects' names, to name examples in the messages.

    Returns
    -------
    numpy.ndarray
        int64 indices, shape (n, 3) for a 3-D image, (n, 2) for a 2-D one (a z column of zeros is dropped).

    Raises
    ------
    TypeError
        The indices are not integers.
    ValueError
        The number of columns does not fit the image, or an index lies outside the image.
    """
    if index.dtype.kind not in "iu":
        raise TypeError(
            f"spatial_key_index={key!r}: .obsm[{key!r}] has dtype {index.dtype}; integer pixel indices are needed. "
            f"Store rounded indices, e.g. adata.obsm[{key!r}] = np.rint(coords).astype(int)."
        )
    n_dims = index.shape[1]
    if is_3d and n_dims != 3:
        raise ValueError(
            f"spatial_key_index={key!r} has {n_dims} columns but sample {sample!r} has a 3-D image; "
            "3-D images need (y, x, z) indices."
        )
    if not is_3d:
        if n_dims == 3 and np.any(index[:, 2] != 0):
            raise ValueError(
                f"spatial_key_index={key!r} has z values other than 0 but sample {sample!r} has a 2-D image; "
                "drop the z column or store a 3-D image."
            )
        index = index[:, :2]
    limits = (image_shape[-2], image_shape[-1]) + ((image_shape[-3],) if is_3d else ())
    names = ("y", "x", "z")
    for col, limit in enumerate(limits):
        bad = (index[:, col] < 0) | (index[:, col] >= limit)
        if bad.any():
            examples = [obs_names[i] for i in np.flatnonzero(bad)[:3]]
            raise ValueError(
                f"spatial_key_index={key!r}: {int(bad.sum())} objects of sample {sample!r} have {names[col]} outside "
                f"the image (0..{limit - 1}), e.g. {examples} with {names[col]}="
                f"{index[bad, col][:3].tolist()}. Check the table's scale against the image or drop those objects."
            )
    return index.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# Intensity statistics and anchors
# --------------------------------------------------------------------------------------------------


class IntensityAccumulator:
    """Per-channel pixel statistics of many patch blocks.

    Exact histograms for integer images of at most 16 bits, a seeded reservoir sample for the others.

    Parameters
    ----------
    n_channels
        Number of channels (the last axis of the patches).
    dtype
        Pixel dtype of the patches.
    seed
        Seed of the reservoir sample (float images).
    """

    def __init__(self, n_channels: int, dtype: np.dtype, seed: int = 0) -> None:
        self.n_channels = n_channels
        self.dtype = np.dtype(dtype)
        self.integer = self.dtype.kind in "iu" and self.dtype.itemsize <= 2
        self.rng = np.random.default_rng(seed)
        self.hist = [np.zeros(0, np.int64) for _ in range(n_channels)]
        self.offset = int(np.iinfo(self.dtype).min) if self.integer else 0
        self.samples: list[list[np.ndarray]] = [[] for _ in range(n_channels)]
        self.count = 0

    def add(self, patches: np.ndarray) -> None:
        """Count the pixels of a block of patches.

        Parameters
        ----------
        patches
            Shape (..., n_channels), in the accumulator's dtype.
        """
        flat = patches.reshape(-1, self.n_channels)
        self.count += flat.shape[0]
        if self.integer:  # in blocks: the int64 copy bincount needs is 8 bytes a pixel
            for start in range(0, flat.shape[0], _HIST_ROWS):
                block = flat[start:start + _HIST_ROWS]
                for c in range(self.n_channels):
                    self._count(c, block[:, c])
            return
        for c in range(self.n_channels):
            values = flat[:, c]
            take = min(len(values), _RESERVOIR)
            # kept in the image's dtype (float32 or narrower; exact) and widened to float64 when pooled
            self.samples[c].append(self.rng.choice(values, size=take, replace=False))

    def _count(self, c: int, values: np.ndarray) -> None:
        counts = np.bincount(values.astype(np.int64) - self.offset)
        if len(counts) > len(self.hist[c]):
            counts[: len(self.hist[c])] += self.hist[c]
            self.hist[c] = counts
        else:
            self.hist[c][: len(counts)] += counts

    def _pooled(self, c: int) -> np.ndarray:
        """Reservoir values of channel ``c`` as one float64 array."""
        return np.concatenate(self.samples[c], dtype=np.float64) if self.samples[c] else np.zeros(1)

    def merged(self, others: Sequence[IntensityAccumulator]) -> IntensityAccumulator:
        """Pool this accumulator with ``others`` (e.g. all samples of a dataset).

        Parameters
        ----------
        others
            Accumulators of the same channels and dtype.

        Returns
        -------
        IntensityAccumulator
            A new accumulator holding the pixels of all of them; the inputs are unchanged.
        """
        out = IntensityAccumulator(self.n_channels, self.dtype)
        for acc in (self, *others):
            out.count += acc.count
            for c in range(self.n_channels):
                if out.integer:
                    size = max(len(out.hist[c]), len(acc.hist[c]))
                    merged = np.zeros(size, np.int64)
                    merged[: len(out.hist[c])] += out.hist[c]
                    merged[: len(acc.hist[c])] += acc.hist[c]
                    out.hist[c] = merged
                else:
                    out.samples[c].extend(acc.samples[c])
        return out

    def quantiles(self, c: int, qs: Sequence[float]) -> np.ndarray:
        """Return quantiles of channel ``c`` (inverted-CDF for histograms).

        Parameters
        ----------
        c
            Channel number.
        qs
            Quantiles in [0, 1].

        Returns
        -------
        numpy.ndarray
            float64, one value per quantile.
        """
        if self.integer:
            hist = self.hist[c]
            cum = np.cumsum(hist)
            if cum.size == 0 or cum[-1] == 0:
                return np.zeros(len(qs))
            pos = np.searchsorted(cum, np.maximum(np.asarray(qs) * cum[-1], 1), side="left")
            return np.minimum(pos, len(hist) - 1).astype(np.float64) + self.offset
        values = self._pooled(c)
        return np.quantile(values, qs)

    def foreground_quantile(self, c: int, q: float) -> float:
        """Return quantile ``q`` of the pixels brighter than the channel's median (the foreground).

        Parameters
        ----------
        c
            Channel number.
        q
            Quantile in [0, 1].

        Returns
        -------
        float
            The quantile, or the median when no pixel is brighter than it.
        """
        med = self.quantiles(c, [0.5])[0]
        if self.integer:
            hist = self.hist[c].copy()
            cut = int(med - self.offset) + 1
            hist[:cut] = 0
            cum = np.cumsum(hist)
            if cum.size == 0 or cum[-1] == 0:
                return float(med)
            return float(min(np.searchsorted(cum, max(q * cum[-1], 1), side="left"), len(hist) - 1) + self.offset)
        values = self._pooled(c)
        fg = values[values > med]
        return float(np.quantile(fg, q)) if fg.size else float(med)

    def stats(self, c: int, percentile: float) -> dict[str, float]:
        """Return the intensity statistics of channel ``c``.

        Parameters
        ----------
        c
            Channel number.
        percentile
            ``p`` of the percentiles ``p`` and ``100 - p``.

        Returns
        -------
        dict
            ``mean``, ``std``, ``median``, ``mad`` (about the channel's own median), ``min``, ``max``,
            ``percentile_low``, ``percentile_high``, ``foreground_high`` (the ``100 - p`` percentile of the
            foreground) and ``n_pixels``.
        """
        lo, med, hi = self.quantiles(c, [percentile / 100, 0.5, 1 - percentile / 100])
        if self.integer:
            hist = self.hist[c].astype(np.float64)
            values = np.arange(len(hist), dtype=np.float64) + self.offset
            total = hist.sum() or 1.0
            mean = float((hist * values).sum() / total)
            std = float(np.sqrt((hist * (values - mean) ** 2).sum() / total))
            dev = np.abs(values - med)
            order = np.argsort(dev, kind="stable")
            cum = np.cumsum(hist[order])
            mad = float(dev[order][min(np.searchsorted(cum, 0.5 * total), len(cum) - 1)]) if len(cum) else 0.0
            nz = np.flatnonzero(hist)
            vmin = float(values[nz[0]]) if len(nz) else 0.0
            vmax = float(values[nz[-1]]) if len(nz) else 0.0
        else:
            v = self._pooled(c)
            mean, std, mad = float(v.mean()), float(v.std()), float(np.median(np.abs(v - med)))
            vmin, vmax = float(v.min()), float(v.max())
        return {"mean": mean, "std": std, "median": float(med), "mad": mad, "min": vmin, "max": vmax,
                "percentile_low": float(lo), "percentile_high": float(hi),
                "foreground_high": self.foreground_quantile(c, 1 - percentile / 100), "n_pixels": self.count}


def anchors_from(acc: IntensityAccumulator, percentile: float, channels: Sequence[str], where: str) -> dict[str, list]:
    """Return the low/high normalization anchors per channel of accumulated patch pixels.

    See the module docstring for the rule; a constant channel gets ``high = low + 1``.

    Parameters
    ----------
    acc
        The accumulated pixels.
    percentile
        ``scale_percentile`` of the dataset.
    channels
        Channel names, for the warning.
    where
        What the pixels are (e.g. ``"sample 'A01'"``), for the warning.

    Returns
    -------
    dict
        ``{"low": [...], "high": [...]}``, one float per channel.

    Warns
    -----
    ConstantChannelWarning
        A channel has a single value.
    """
    low, high = [], []
    for c, name in enumerate(channels):
        s = acc.stats(c, percentile)
        lo, hi = s["percentile_low"], s["foreground_high"]
        if hi <= lo:
            hi = s["max"]
        if hi <= lo:
            warnings.warn(
                f"channel {name!r} is constant ({lo}) in the patches of {where}; it normalizes to 0.",
                ConstantChannelWarning, stacklevel=3,
            )
            hi = lo + 1.0
        low.append(float(lo))
        high.append(float(hi))
    return {"low": low, "high": high}


def normalize(raw: np.ndarray, low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    """Return ``clip((raw - low) / (high - low), 0, 1)`` per channel (last axis), as float32.

    Parameters
    ----------
    raw
        Patches, channels on the last axis.
    low, high
        Anchors, one per channel.

    Returns
    -------
    numpy.ndarray
        float32 values in [0, 1], the shape of ``raw``.
    """
    low = np.asarray(low, np.float32)
    scale = 1.0 / (np.asarray(high, np.float32) - low)
    out = raw.astype(np.float32)
    out -= low
    out *= scale
    np.clip(out, 0.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------------


def _read_parquet(path: Path) -> pd.DataFrame:
    """``pd.read_parquet(path)``, decoded in batches of rows straight into the DataFrame's columns.

    Neither the whole file as one Arrow table nor a second copy of the DataFrame is held: reading an index of
    300,000 patches (a DataFrame of about 55 MB) peaked 189 MB above the process with ``pd.read_parquet``
    (Arrow's table and decoding buffers) and 97 MB so; at the end of ``generate_dataset`` it raised the peak by
    143 MB and by 25 MB. A file with a stored index or named columns, columns of other than numpy dtypes, a
    dtype that changes between batches (missing values) and pandas' string dtype (``future.infer_string``,
    which ``pd.read_parquet`` maps) are left to ``pd.read_parquet``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        infer_string = pd.get_option("future.infer_string")
    except (KeyError, AttributeError):  # an option pandas no longer has: its string dtype is the default
        infer_string = True
    with pq.ParquetFile(path) as file:
        meta = file.schema_arrow.pandas_metadata or {}
        if infer_string or meta.get("index_columns") or any(c.get("name") for c in meta.get("column_indexes", [])):
            return pd.read_parquet(path)
        n, start, columns = file.metadata.num_rows, 0, {}
        for batch in file.iter_batches(batch_size=_READ_ROWS, use_threads=False):
            frame = pa.Table.from_batches([batch]).to_pandas()
            if not start:
                columns = {c: np.empty(n, dtype) for c, dtype in frame.dtypes.items() if isinstance(dtype, np.dtype)}
            if len(columns) != frame.shape[1] or any(frame[c].dtype != a.dtype for c, a in columns.items()):
                return pd.read_parquet(path)
            for c, values in columns.items():
                values[start:start + len(frame)] = frame[c].to_numpy()
            start += len(frame)
        if not start:
            return pd.read_parquet(path)
    # one block a column, the arrays as they are: no consolidating copy and (dtype given) no inference pass
    return pd.DataFrame({c: pd.Series(v, dtype=v.dtype, copy=False) for c, v in columns.items()}, copy=False)


@dataclass
class PatchDataset:
    """A patch dataset folder (see the module docstring for the layout); made by :meth:`open`.

    Parameters
    ----------
    path
        The dataset folder ``<dir_dataset>/<dataset>``.
    settings
        The content of its ``settings.json``.
    index
        Its ``index.parquet``, one row per patch.
    """

    path: Path
    settings: dict[str, Any]
    index: pd.DataFrame

    @classmethod
    def open(cls, path: str | Path) -> PatchDataset:
        """Open the dataset folder ``<dir_dataset>/<dataset>``.

        Parameters
        ----------
        path
            The dataset folder.

        Returns
        -------
        PatchDataset
            Its settings and index (the patches are read on demand).

        Raises
        ------
        FileNotFoundError
            ``path`` holds no ``settings.json``.
        ValueError
            The dataset was written in a newer format.
        """
        import json

        path = Path(path)
        if not (path / SETTINGS_FILE).exists():
            raise FileNotFoundError(
                f"{str(path)!r} is not a patch dataset (no {SETTINGS_FILE}); run generate_dataset first."
            )
        settings = json.loads((path / SETTINGS_FILE).read_text())
        if settings.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"dataset {str(path)!r} was written by a newer Phenocoder (format {settings['format_version']}); "
                "upgrade phenocoder."
            )
        index = _read_parquet(path / INDEX_FILE)
        index["sample"] = index["sample"].astype(str)
        return cls(path, settings, index)

    @property
    def name(self) -> str:
        """The dataset's name."""
        return self.settings["dataset"]

    @property
    def samples(self) -> list[str]:
        """The samples, in the order they were extracted."""
        return list(self.settings["samples"])

    @property
    def patch_size(self) -> tuple[int, int]:
        """(height, width) of the patches."""
        return tuple(self.settings["patch_size"])  # type: ignore[return-value]

    @property
    def channels(self) -> list[str]:
        """The channel names."""
        return list(self.settings["channels"])

    def stats(self) -> pd.DataFrame:
        """Return the per (sample, channel) intensity statistics.

        Returns
        -------
        pandas.DataFrame
            The content of ``stats.parquet``.
        """
        return pd.read_parquet(self.path / STATS_FILE)

    def anchors(self, sample: str) -> tuple[np.ndarray, np.ndarray]:
        """Return the (low, high) normalization anchors of ``sample``.

        Parameters
        ----------
        sample
            A sample of the dataset.

        Returns
        -------
        tuple of numpy.ndarray
            (low, high), float32, one value per channel.
        """
        return anchors_for(self.settings, sample)

    def read(self, sample: str, rows: np.ndarray | None = None, *, normalized: bool = True) -> np.ndarray:
        """Read patches of ``sample``.

        Parameters
        ----------
        sample
            A sample of the dataset.
        rows
            Store rows (the index's ``row`` column) to read; default all, in store order.
        normalized
            Normalize with the dataset's anchors (float32 in [0, 1]; float32 raw values for a dataset
            made with ``scale=False``); ``False`` gives the stored values.

        Returns
        -------
        numpy.ndarray
            Shape (n, height, width, channels).

        Raises
        ------
        KeyError
            ``sample`` is not in the dataset.
        """
        import zarr

        sample = str(sample)
        if sample not in self.settings["samples"]:
            raise KeyError(f"sample {sample!r} is not in dataset {self.name!r}; samples: {self.samples}.")
        arr = zarr.open_array(self.path / STORE_DIR / sample, mode="r")
        raw = arr[:] if rows is None else arr.get_orthogonal_selection((np.asarray(rows),))
        if not normalized:
            return raw
        return normalize_for(raw, self.settings, sample)


def anchors_for(
    settings: dict[str, Any], sample: str, fallback: dict[str, list] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the (low, high) anchors that a dataset's ``settings`` prescribe for ``sample``.

    Per-sample mode uses the sample's stored anchors, or ``fallback`` (anchors computed from that
    sample's own patches) for a sample not in the dataset.

    Parameters
    ----------
    settings
        A dataset's settings (``PatchDataset.settings``).
    sample
        The sample id.
    fallback
        Anchors for a sample the dataset does not have (see :func:`compute_anchors`).

    Returns
    -------
    tuple of numpy.ndarray
        (low, high), float32, one value per channel.

    Raises
    ------
    KeyError
        Per-sample mode, ``sample`` not in the dataset and no ``fallback``.
    """
    norm = settings["normalization"]
    if norm["scale_per_sample"]:
        entry = norm["per_sample"].get(str(sample), fallback)
        if entry is None:
            raise KeyError(
                f"sample {sample!r} has no per-sample anchors in dataset {settings['dataset']!r}; compute them "
                "from its patches (patches.compute_anchors) and pass them as fallback."
            )
    else:
        entry = norm["global"]
    return np.asarray(entry["low"], np.float32), np.asarray(entry["high"], np.float32)


def normalize_for(
    raw: np.ndarray, settings: dict[str, Any], sample: str, fallback: dict[str, list] | None = None
) -> np.ndarray:
    """Normalize raw patches of ``sample`` as a dataset's ``settings`` prescribe.

    Parameters
    ----------
    raw
        Patches, channels on the last axis.
    settings
        A dataset's settings (``PatchDataset.settings``).
    sample
        The sample id.
    fallback
        Anchors for a sample the dataset does not have (see :func:`anchors_for`).

    Returns
    -------
    numpy.ndarray
        float32, in [0, 1] unless the dataset was made with ``scale=False`` (then the raw values).
    """
    if not settings["normalization"]["scale"]:
        return raw.astype(np.float32)
    low, high = anchors_for(settings, sample, fallback)
    return normalize(raw, low, high)


def compute_anchors(raw: np.ndarray, settings: dict[str, Any], where: str = "a new sample") -> dict[str, list]:
    """Compute anchors of ``raw`` patches with a dataset's percentile (for samples not in the dataset).

    Parameters
    ----------
    raw
        Patches of one sample, channels on the last axis.
    settings
        A dataset's settings (``PatchDataset.settings``).
    where
        What the patches are, for the constant-channel warning.

    Returns
    -------
    dict
        ``{"low": [...], "high": [...]}``, one float per channel.
    """
    acc = IntensityAccumulator(raw.shape[-1], raw.dtype)
    acc.add(raw)
    return anchors_from(acc, settings["normalization"]["scale_percentile"], settings["channels"], where)


class _ChunkWriter:
    """Append rows to a zarr array in whole chunks (partial-chunk writes would re-compress chunks)."""

    def __init__(self, arr: Any) -> None:
        self.arr, self.chunk = arr, arr.chunks[0]
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    @property
    def n_rows(self) -> int:
        return self.written + self.buffered

    def append(self, rows: np.ndarray) -> None:
        self.buffer.append(rows)
        self.buffered += len(rows)
        if self.buffered >= self.chunk:
            self.flush(whole_chunks_only=True)

    def flush(self, whole_chunks_only: bool = False) -> None:
        if not self.buffered:
            return
        data = np.concatenate(self.buffer) if len(self.buffer) > 1 else self.buffer[0]
        n = (len(data) // self.chunk) * self.chunk if whole_chunks_only else len(data)
        if n:
            self.arr[self.written:self.written + n] = data[:n]
            self.written += n
        rest = data[n:]
        self.buffer = [rest] if len(rest) else []
        self.buffered = len(rest)


def _sample_rows(column: pd.Series) -> tuple[list[str], list[np.ndarray]]:
    """Sample ids as strings, in order of first appearance, and each one's row positions (ascending).

    Values that print the same (``1`` and ``"1"``) are one sample, as ``column.astype(str)`` would make them.
    """
    # an array, not the Series: numpy asking a Series for its array attributes builds the hash table of its
    # (object) index, about 26 bytes an object that would stay cached on the caller's table
    uniques, groups = group_rows(column.to_numpy())
    names = [str(u) for u in uniques]
    if len(set(names)) == len(names):
        return names, groups
    merged: dict[str, list[np.ndarray]] = {}
    for name, rows in zip(names, groups, strict=True):
        merged.setdefault(name, []).append(rows)
    return list(merged), [np.sort(np.concatenate(r)) if len(r) > 1 else r[0] for r in merged.values()]


def _arrow_type(values: np.ndarray, groups: Sequence[np.ndarray]) -> Any:
    """The Arrow type that ``DataFrame.to_parquet`` infers for object ``values`` over the rows of ``groups``."""
    import pyarrow as pa

    types = {pa.infer_type(values[rows], from_pandas=True) for rows in groups}
    if len(types) == 1:
        return types.pop()
    schemas = [pa.schema([("v", t)]) for t in types]
    return pa.unify_schemas(schemas, promote_options="permissive").field("v").type


class _IndexWriter:
    """Write ``index.parquet`` from per-sample frames, as ``pd.concat(frames).to_parquet(index=False)`` would.

    Each frame becomes Arrow columns at once (a few bytes a row, no Python object per row), and a row group is
    written as soon as pyarrow's default row-group size (1024**2 rows, about 100 bytes a row here) is buffered,
    so at most one row group is held and the file is byte-identical to the one ``to_parquet`` writes for the
    whole index. ``object_types`` are the Arrow types of object columns over all samples (a sample's own
    values may infer another type, e.g. null when all of them are missing).
    """

    def __init__(self, path: Path, object_types: dict[str, Any]) -> None:
        self.path, self.object_types = path, object_types
        self.schema: Any = None
        self.writer: Any = None
        self.pieces: list[Any] = []
        self.buffered = 0

    def __enter__(self) -> _IndexWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        import pyarrow as pa

        if exc_type is None and self.buffered:
            self._write(self.buffered)
        if self.writer is not None:
            self.writer.close()
        self.pieces = []
        pa.default_memory_pool().release_unused()  # hand the buffered row group back before the index is read

    def _schema(self, frame: pd.DataFrame) -> Any:
        import json

        import pyarrow as pa
        from pyarrow.pandas_compat import get_logical_type

        schema = pa.Schema.from_pandas(frame, preserve_index=False)
        other = {k: t for k, t in self.object_types.items() if schema.field(k).type != t}
        if not other:
            return schema
        meta = json.loads(schema.metadata[b"pandas"])
        for name, arrow_type in other.items():
            schema = schema.set(schema.get_field_index(name), pa.field(name, arrow_type))
            next(c for c in meta["columns"] if c["name"] == name)["pandas_type"] = get_logical_type(arrow_type)
        return schema.with_metadata({b"pandas": json.dumps(meta).encode("utf8")})

    def append(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.schema = self._schema(frame)
            self.writer = pq.ParquetWriter(self.path, self.schema, compression="snappy")  # to_parquet's default
        self.pieces.append(pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False))
        self.buffered += len(frame)
        while self.buffered >= _ROW_GROUP:
            self._write(_ROW_GROUP)

    def _write(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.pieces)
        self.writer.write_table(table.slice(0, n))
        rest = table.slice(n)
        self.pieces = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows


@dataclass
class _Selection:
    """The objects a dataset gets: samples in order of first appearance and each one's table rows (ascending)."""

    samples: list[str]
    rows_of: dict[str, np.ndarray]


def _checked_table(
    sdata: Any, *, dataset: str, table_key: str, sample_key: str, spatial_key_index: str,
    patch_size: int | Sequence[int], scale_percentile: float, metadata_keys: Sequence[str] | None,
) -> tuple[Any, np.ndarray, tuple[int, int], list[str]]:
    """Check the arguments against ``sdata``; return the table, its pixel indices, the patch size and the kept columns.

    Raises
    ------
    KeyError
        ``table_key``, ``sample_key``, ``spatial_key_index`` or a metadata key is not in the data.
    ValueError
        ``dataset`` is not a folder name, ``scale_percentile`` is outside [0, 50), object names repeat or a
        sample id is missing.
    """
    if not isinstance(dataset, str) or not dataset or "/" in dataset or dataset.startswith("."):
        raise ValueError(f"dataset={dataset!r} must be a non-empty name without '/' (it becomes a folder).")
    patch_size = check_int_pair(patch_size, argument="patch_size")
    check_in_range(scale_percentile, 0, 50, argument="scale_percentile", high_open=True,
                   meaning="percent: low = p, high = 100 - p")
    check_key(sdata.tables, table_key, argument="table_key", what="table of the SpatialData object",
              fix="Pass the name of the per-object table (read_plate(table_key=...) names it).")
    table = sdata.tables[table_key]
    check_unique_obs_names(table, argument=f"table_key={table_key!r}")
    check_no_missing(table.obs, sample_key, argument="sample_key")
    index_all = check_obsm(table, spatial_key_index, argument="spatial_key_index", n_cols=(2, 3))
    # columns the index writes itself are not copied again
    kept = [k for k in (metadata_keys or []) if k not in (sample_key, "sample", "y", "x", "z", "dataset")]
    for key in kept:
        check_obs_column(table.obs, key, argument="metadata_keys")
    return table, index_all, patch_size, kept


def _select_objects(
    table: Any, *, table_key: str, sample_key: str, n_samples: int | None, n_patches: int | None, seed: int
) -> _Selection:
    """Group the table's rows by sample, then draw ``n_samples`` samples and ``n_patches`` of their objects.

    One generator seeded with ``seed`` draws the samples first and then the objects, so a dataset is
    reproducible from its settings. Samples left without objects by the second draw are dropped.
    """
    # one pass over the table: no per-object strings and no per-sample scans of the whole table
    samples, groups = _sample_rows(table.obs[sample_key])
    if not samples:
        raise ValueError(f"table {table_key!r} has no objects; nothing to extract.")
    rows_of = dict(zip(samples, groups, strict=True))
    rng = np.random.default_rng(seed)
    if n_samples is not None:
        check_in_range(n_samples, 1, len(samples), argument="n_samples",
                       meaning="between 1 and the number of samples")
        samples = sorted(rng.choice(samples, size=n_samples, replace=False).tolist(), key=samples.index)
    if n_patches is not None:
        check_in_range(n_patches, 1, None, argument="n_patches")
        n_selected = sum(len(rows_of[s]) for s in samples)
        if n_patches < n_selected:
            selected = np.sort(np.concatenate([rows_of[s] for s in samples]))  # the rows of the drawn samples
            keep = np.zeros(table.n_obs, bool)
            keep[np.sort(rng.choice(selected, size=n_patches, replace=False))] = True
            del selected
            rows_of = {s: rows_of[s][keep[rows_of[s]]] for s in samples}
            del keep
            samples = [s for s in samples if len(rows_of[s])]
    return _Selection(samples, {s: rows_of[s] for s in samples})


@dataclass
class _SamplePatches:
    """What extracting one sample's patches gives: its index rows, pixel statistics and image description."""

    frame: pd.DataFrame
    acc: IntensityAccumulator
    channels: list[str]
    image_dtype: np.dtype
    n_padded: int


def _extract_sample(
    sdata: Any, store: Any, sample: str, rows: np.ndarray, *, table: Any, index_all: np.ndarray,
    image_key: str, spatial_key_index: str, patch_size: tuple[int, int], dataset: str,
    metadata: dict[str, np.ndarray], seed: int, expected_channels: list[str] | None,
) -> _SamplePatches:
    """Cut the patches of one sample's objects (table ``rows``), store them as ``store[sample]`` and measure them.

    Patches are written in z-plane order in whole chunks; the returned index frame gives each object's
    store ``row``. Float64 images are stored as float32. The image's channels must be
    ``expected_channels`` (those of the first sample) unless that is ``None``.
    """
    image, channels, is_3d = image_array(sdata, f"{image_key}_{sample}")
    if expected_channels is not None and channels != expected_channels:
        raise ValueError(f"sample {sample!r} has channels {channels}; the first sample had {expected_channels}.")
    store_dtype = np.float32 if image.dtype == np.float64 else image.dtype
    idx = validate_index(index_all[rows], image_shape=image.shape, is_3d=is_3d, key=spatial_key_index,
                         sample=sample, obs_names=table.obs_names[rows])
    arr = store.create_array(
        sample, shape=(len(rows), *patch_size, len(channels)), dtype=store_dtype,
        chunks=(min(_CHUNK_ROWS, max(len(rows), 1)), *patch_size, len(channels)),
    )
    acc = IntensityAccumulator(len(channels), store_dtype, seed=seed)
    order, padded = np.empty(len(rows), np.int64), np.zeros(len(rows), bool)
    writer = _ChunkWriter(arr)
    for pos, patches, pad in iter_patches(image, idx, patch_size, is_3d):
        patches = patches.astype(store_dtype, copy=False)
        order[writer.n_rows:writer.n_rows + len(pos)] = pos
        writer.append(patches)
        acc.add(patches)
        padded[pos] = pad
    writer.flush()
    store_row = np.empty(len(rows), np.int64)
    store_row[order] = np.arange(len(rows))
    frame = pd.DataFrame({
        "obs_name": table.obs_names[rows].astype(str),
        "sample": sample,
        "y": idx[:, 0], "x": idx[:, 1], "z": idx[:, 2] if is_3d else 0,
        "row": store_row, "padded": padded, "dataset": dataset,
    })
    for key, values in metadata.items():
        frame[key] = values[rows]
    return _SamplePatches(frame, acc, channels, np.dtype(image.dtype), int(padded.sum()))


@dataclass
class _Extracted:
    """What extracting every selected sample gives: pixel statistics per sample and totals."""

    accs: dict[str, IntensityAccumulator]
    channels: list[str]
    image_dtype: np.dtype
    n_patches: int
    n_padded: int


def _extract_samples(
    sdata: Any, folder: Path, selection: _Selection, *, table: Any, index_all: np.ndarray, image_key: str,
    spatial_key_index: str, patch_size: tuple[int, int], dataset: str, metadata_keys: list[str], seed: int,
    progress: bool,
) -> _Extracted:
    """Store every selected sample's patches in ``folder/patches.zarr`` and its index rows in ``index.parquet``.

    Samples are processed one at a time and each one's index rows are written as soon as its patches are
    stored, so only one sample's patches and at most one Parquet row group are held. ``selection`` is
    emptied on the way (each sample's rows are dropped once used).
    """
    from tqdm.auto import tqdm

    # numpy columns are sliced per sample in place; others (categoricals) are converted once here
    metadata = {key: table.obs[key].to_numpy() for key in metadata_keys}
    object_types = {key: _arrow_type(values, list(selection.rows_of.values()))
                    for key, values in metadata.items() if values.dtype == object}
    accs: dict[str, IntensityAccumulator] = {}
    first: _SamplePatches | None = None
    n_total = n_padded = 0
    with _IndexWriter(folder / INDEX_FILE, object_types) as index_writer:
        import zarr

        store = zarr.open_group(folder / STORE_DIR, mode="w")
        for sample in tqdm(selection.samples, desc="Extracting patches", disable=not progress):
            rows = selection.rows_of.pop(sample)
            one = _extract_sample(
                sdata, store, sample, rows, table=table, index_all=index_all, image_key=image_key,
                spatial_key_index=spatial_key_index, patch_size=patch_size, dataset=dataset, metadata=metadata,
                seed=seed, expected_channels=None if first is None else first.channels,
            )
            if first is None:
                first = one
            index_writer.append(one.frame)  # written now, as compact Arrow columns: no Python object per row is kept
            accs[sample] = one.acc
            n_total, n_padded = n_total + len(rows), n_padded + one.n_padded
            logger.info("sample %s: %d patches (%d padded at the border)", sample, len(rows), one.n_padded)
            one.frame = None  # type: ignore[assignment]  # freed before the next sample is read
    assert first is not None  # a selection always has a sample
    return _Extracted(accs, first.channels, first.image_dtype, n_total, n_padded)


def _write_stats_and_anchors(
    folder: Path, accs: dict[str, IntensityAccumulator], channels: list[str], *, scale: bool,
    scale_percentile: float, scale_per_sample: bool,
) -> tuple[dict[str, list] | None, dict[str, dict[str, list]]]:
    """Write ``stats.parquet`` and return the pooled anchors (``None`` unless ``scale``) and the per-sample ones."""
    stats_rows, per_sample = [], {}
    for sample, acc in accs.items():
        for c, name in enumerate(channels):
            stats_rows.append({"sample_id": sample, "channel": name, **acc.stats(c, scale_percentile)})
        if scale and scale_per_sample:
            per_sample[sample] = anchors_from(acc, scale_percentile, channels, f"sample {sample!r}")
    pooled = next(iter(accs.values())).merged(list(accs.values())[1:])
    global_anchors = anchors_from(pooled, scale_percentile, channels, "all samples") if scale else None
    pd.DataFrame(stats_rows).to_parquet(folder / STATS_FILE, index=False)
    return global_anchors, per_sample


def _settings_record(
    *, dataset: str, patch_size: tuple[int, int], channels: list[str], image_dtype: np.dtype, table_key: str,
    sample_key: str, image_key: str, spatial_key_index: str, metadata_keys: list[str], samples: list[str],
    n_patches: int, n_padded: int, seed: int, scale: bool, scale_per_sample: bool, scale_percentile: float,
    global_anchors: dict[str, list] | None, per_sample: dict[str, dict[str, list]],
) -> dict[str, Any]:
    """The content of ``settings.json``: how the dataset was made and how its patches are normalized."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "patch_size": list(patch_size),
        "channels": channels,
        "image_dtype": str(image_dtype),
        "store_dtype": str(np.dtype(np.float32 if image_dtype == np.float64 else image_dtype)),
        "table_key": table_key,
        "sample_key": sample_key,
        "image_key": image_key,
        "spatial_key_index": spatial_key_index,
        "metadata_keys": list(metadata_keys),
        "samples": samples,
        "n_patches": n_patches,
        "n_padded": n_padded,
        "seed": seed,
        "padding": "constant: per-plane channel minimum",
        "normalization": {
            "scale": bool(scale),
            "scale_per_sample": bool(scale_per_sample),
            "scale_percentile": float(scale_percentile),
            "global": global_anchors,
            "per_sample": per_sample,
        },
    }


def generate_dataset(
    sdata: Any,
    *,
    dataset: str,
    dir_dataset: str | Path,
    table_key: str,
    sample_key: str,
    image_key: str,
    patch_size: int | Sequence[int] = (128, 128),
    spatial_key_index: str = "spatial_index",
    scale: bool = True,
    scale_percentile: float = 1.0,
    scale_per_sample: bool = True,
    metadata_keys: Sequence[str] | None = None,
    n_samples: int | None = None,
    n_patches: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> PatchDataset:
    """Extract, measure and store the patches of every object (or a seeded subset).

    Reads ``sdata.tables[table_key]`` (``.obs[sample_key]``, ``.obsm[spatial_key_index]``, the
    ``metadata_keys`` columns) and ``sdata.images[f"{image_key}_{sample}"]``; writes
    ``<dir_dataset>/<dataset>/`` atomically (an earlier dataset of that name is replaced only when the
    new one is complete). The phases: check the arguments, select the objects, extract and store each
    sample's patches (its index rows written at once), then write the statistics, the anchors and
    ``settings.json``.

    Parameters
    ----------
    sdata
        The SpatialData object holding the table and the images.
    dataset
        Dataset name (a sub-folder of ``dir_dataset``); also recorded per patch (condition ``dataset``).
    dir_dataset
        Parent folder of the dataset.
    table_key
        Name of the per-object table in ``sdata.tables``.
    sample_key
        ``.obs`` column with each object's sample id.
    image_key
        Image name prefix: the image of a sample is ``sdata.images[f"{image_key}_{sample}"]``.
    patch_size
        (height, width) in pixels, or one int for a square; odd and non-square sizes work.
    spatial_key_index
        ``.obsm`` key with integer (y, x[, z]) indices into the images.
    scale
        Whether patches are normalized when read (see the module docstring); recorded in ``settings.json``.
    scale_percentile
        Percentile ``p`` in [0, 50) of the anchors: ``low`` is the ``p`` percentile of all patch pixels,
        ``high`` the ``100 - p`` percentile of the foreground pixels.
    scale_per_sample
        One set of anchors per sample (``True``) or one pooled over all samples.
    metadata_keys
        Extra ``.obs`` columns to keep in the index (e.g. condition columns for a CondCVAE).
    n_samples
        Keep a seeded draw of this many samples (default all).
    n_patches
        Keep at most this many objects, drawn (seeded) from the selected samples (default all).
    seed
        Seed for the subsets (and the float-image pixel reservoir).
    progress
        Show a progress bar over samples.

    Returns
    -------
    PatchDataset
        The dataset just written, opened from ``<dir_dataset>/<dataset>``.

    Raises
    ------
    KeyError
        A key or column named by the arguments is not in ``sdata``.
    ValueError
        An argument is out of range, object names repeat, samples have different channels or an object's
        index lies outside its image; an earlier dataset of the same name is then kept unchanged.
    TypeError
        ``.obsm[spatial_key_index]`` does not hold integer pixel indices.
    """
    table, index_all, patch_size, metadata_keys = _checked_table(
        sdata, dataset=dataset, table_key=table_key, sample_key=sample_key, spatial_key_index=spatial_key_index,
        patch_size=patch_size, scale_percentile=scale_percentile, metadata_keys=metadata_keys,
    )
    selection = _select_objects(table, table_key=table_key, sample_key=sample_key, n_samples=n_samples,
                                n_patches=n_patches, seed=seed)
    samples = selection.samples
    dir_dataset = Path(dir_dataset)
    with atomic_dir(dir_dataset / dataset) as tmp:
        extracted = _extract_samples(
            sdata, tmp, selection, table=table, index_all=index_all, image_key=image_key,
            spatial_key_index=spatial_key_index, patch_size=patch_size, dataset=dataset, metadata_keys=metadata_keys,
            seed=seed, progress=progress,
        )
        global_anchors, per_sample = _write_stats_and_anchors(
            tmp, extracted.accs, extracted.channels, scale=scale, scale_percentile=scale_percentile,
            scale_per_sample=scale_per_sample,
        )
        settings = _settings_record(
            dataset=dataset, patch_size=patch_size, channels=extracted.channels, image_dtype=extracted.image_dtype,
            table_key=table_key, sample_key=sample_key, image_key=image_key, spatial_key_index=spatial_key_index,
            metadata_keys=metadata_keys, samples=samples, n_patches=extracted.n_patches,
            n_padded=extracted.n_padded, seed=seed, scale=scale, scale_per_sample=scale_per_sample,
            scale_percentile=scale_percentile, global_anchors=global_anchors, per_sample=per_sample,
        )
        write_json_atomic(tmp / SETTINGS_FILE, settings)
    if not scale:
        logger.warning("scale=False: patches keep raw intensities; the VAE's sigmoid output expects values in [0, 1].")
    return PatchDataset.open(dir_dataset / dataset)
