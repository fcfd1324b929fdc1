"""Training: input pipeline from the patch store, split, callbacks, checkpoints, metrics history.

Input pipeline
    Each sample's raw patches are read from the dataset's zarr store once, with one sequential read
    per sample (no per-patch file reads), and kept in memory in the store's dtype (uint8/uint16: 4 KiB
    per 32x32x4 uint8 patch). Batches are gathered, normalized with the dataset's stored anchors
    (``(v - low) / (high - low)`` clipped to [0, 1], per sample or global as the dataset was made) and
    augmented in a ``keras.utils.PyDataset``; with the TensorFlow backend Keras feeds it through a
    prefetching ``tf.data`` pipeline, so batch preparation runs on one core while the model trains on
    the other (``n_workers > 1`` adds preparation threads). When the raw patches would exceed
    ``memory_budget_bytes`` the data stays on disk and batches are read chunk-wise (see
    :class:`PatchData`), with a block-wise shuffle.

Split
    By object within each (dataset, sample): a seeded ``validation_fraction`` of every sample's
    objects is held out, at least one object per split whenever the sample has two or more. With
    ``split_by="sample"`` whole samples are held out instead (for many samples, to measure
    generalization to new wells); both splits are then still never empty.

Augmentation and order
    Training batches only: with ``flip=True`` each patch gets one of the 8 dihedral transforms
    (rotations by 0/90/180/270 degrees, with or without a mirror; 4 for non-square patches), drawn
    from ``(seed, epoch, batch)``; with ``shuffle=True`` the training order is a seeded permutation
    per epoch. Validation batches are neither shuffled nor augmented.

Callbacks (:func:`fit`)
    EarlyStopping on ``val_loss`` with the best weights restored, ReduceLROnPlateau, TensorBoard
    event files, a best-so-far checkpoint ``checkpoint.keras`` written atomically whenever
    ``val_loss`` improves, and the metrics history (``loss``, ``reconstruction_loss``, ``kl_loss``,
    their ``val_*``, ``learning_rate`` used in the epoch, epoch seconds and patches/s) written to
    ``history.json`` and ``history.csv`` after every epoch.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import patches as P  # noqa: E402
from ._grouping import group_rows  # noqa: E402
from ._io import write_json_atomic, write_text_atomic  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "PatchData",
    "PatchSequence",
    "check_datasets",
    "TFPatchBatches",
    "fit",
    "load_patch_data",
    "make_batches",
    "split_train_val",
]

#: Default memory budget for raw patches held in RAM during training.
DEFAULT_MEMORY_BUDGET = 8 * 2**30
_SETTING_KEYS = ("patch_size", "channels", "spatial_key_index", "store_dtype")
_NORM_KEYS = ("scale", "scale_per_sample", "scale_percentile")


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def check_datasets(datasets: Sequence[P.PatchDataset], input_shape: Sequence[int]) -> dict[str, Any]:
    """Check that the datasets agree with each other and with ``input_shape``; return the first's settings.

    Raises ``ValueError`` naming the argument and the fix (before anything is trained).
    """
    if not datasets:
        raise ValueError("No patch dataset: call generate_dataset(...) first.")
    ref = datasets[0].settings
    for ds in datasets[1:]:
        for key in _SETTING_KEYS:
            if ds.settings.get(key) != ref.get(key):
                raise ValueError(
                    f"datasets {ref['dataset']!r} and {ds.name!r} differ in {key}: {ref.get(key)!r} vs "
                    f"{ds.settings.get(key)!r}; a model is trained on datasets made with the same settings. "
                    "Regenerate one of them."
                )
        for key in _NORM_KEYS:
            if ds.settings["normalization"][key] != ref["normalization"][key]:
                raise ValueError(
                    f"datasets {ref['dataset']!r} and {ds.name!r} differ in normalization {key}: "
                    f"{ref['normalization'][key]!r} vs {ds.settings['normalization'][key]!r}; regenerate one of "
                    "them with the same scale, scale_per_sample and scale_percentile."
                )
    h, w = ref["patch_size"]
    n_channels = len(ref["channels"])
    shape = tuple(int(v) for v in input_shape)
    if shape[:2] != (h, w):
        raise ValueError(
            f"input_shape={shape} does not match the datasets' patch_size=({h}, {w}); pass "
            f"input_shape=({h}, {w}, {n_channels}) or regenerate the dataset with patch_size={shape[:2]}."
        )
    if shape[2] != n_channels:
        raise ValueError(
            f"input_shape={shape} has {shape[2]} channels but the datasets have {n_channels} "
            f"({ref['channels']}); pass input_shape=({h}, {w}, {n_channels})."
        )
    return ref


@dataclass
class PatchData:
    """All training patches of a model: raw values (in RAM or on disk), anchors and conditions.

    Rows follow ``index`` (datasets in order, samples in dataset order, store order within a sample).
    ``group`` maps each row to its (low, inv) anchor pair; ``conditions`` is (n, width) or None.
    """

    index: pd.DataFrame
    group: np.ndarray
    low: np.ndarray
    inv: np.ndarray
    scale: bool
    conditions: np.ndarray | None
    patch_shape: tuple[int, int, int]
    raw: np.ndarray | None = None  # in-memory raw patches, or None when streaming from disk
    stores: list[tuple[Path, str]] | None = None  # per block id: (dataset folder, sample)
    block_of_row: np.ndarray | None = None  # streaming: block id of every row
    store_row: np.ndarray | None = None  # streaming: row in the sample's zarr array
    chunk_rows: int = 1024

    def __post_init__(self) -> None:
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_chunks = 32

    def __len__(self) -> int:
        return len(self.index)

    @property
    def in_memory(self) -> bool:
        """Whether the raw patches are held in RAM."""
        return self.raw is not None

    def raw_rows(self, pos: np.ndarray) -> np.ndarray:
        """Raw patches of rows ``pos`` (in the given order)."""
        if self.raw is not None:
            return self.raw[pos]
        out = None
        blocks, chunks = self.block_of_row[pos], self.store_row[pos] // self.chunk_rows
        for key in sorted(set(zip(blocks.tolist(), chunks.tolist(), strict=True))):
            sel = np.flatnonzero((blocks == key[0]) & (chunks == key[1]))
            data = self._chunk(*key)
            part = data[self.store_row[pos[sel]] - key[1] * self.chunk_rows]
            if out is None:
                out = np.empty((len(pos), *part.shape[1:]), part.dtype)
            out[sel] = part
        return out

    def _chunk(self, block: int, chunk: int) -> np.ndarray:
        import zarr

        key = (block, chunk)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        folder, sample = self.stores[block]
        arr = zarr.open_array(folder / P.STORE_DIR / sample, mode="r")
        data = arr[chunk * self.chunk_rows:(chunk + 1) * self.chunk_rows]
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        return data

    def batch(self, pos: np.ndarray) -> np.ndarray:
        """Return normalized float32 patches (len(pos), h, w, c) of rows ``pos``."""
        x = self.raw_rows(pos).astype(np.float32)
        if self.scale:
            g = self.group[pos]
            x -= self.low[g][:, None, None, :]
            x *= self.inv[g][:, None, None, :]
            np.clip(x, 0.0, 1.0, out=x)
        return x


def load_patch_data(
    datasets: Sequence[P.PatchDataset],
    *,
    conditions: np.ndarray | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> PatchData:
    """Read the raw patches of every dataset (one sequential read per sample) into a :class:`PatchData`.

    ``conditions`` must have one row per row of the concatenated dataset indexes (see
    :func:`training_index`). Above ``memory_budget_bytes`` the patches stay on disk and are read
    chunk-wise per batch.
    """
    index = training_index(datasets)
    ref = datasets[0].settings
    h, w = ref["patch_size"]
    c = len(ref["channels"])
    itemsize = np.dtype(ref["store_dtype"]).itemsize
    total = len(index) * h * w * c * itemsize
    norm = ref["normalization"]
    scale = bool(norm["scale"])
    groups: dict[tuple, int] = {}
    lows, highs = [], []
    group = np.empty(len(index), np.int32)
    stores: list[tuple[Path, str]] = []
    block_of_row = np.empty(len(index), np.int32)
    in_memory = total <= memory_budget_bytes
    raw = np.empty((len(index), h, w, c), np.dtype(ref["store_dtype"])) if in_memory else None
    start = 0
    for ds in datasets:
        for sample in ds.samples:
            n = int((ds.index["sample"] == sample).sum())
            if n == 0:
                continue
            sl = slice(start, start + n)
            if scale:
                key = (ds.name, sample) if norm["scale_per_sample"] else (ds.name,)
                if key not in groups:
                    low, high = ds.anchors(sample)
                    groups[key] = len(lows)
                    lows.append(low)
                    highs.append(high)
                group[sl] = groups[key]
            else:
                group[sl] = 0
            block_of_row[sl] = len(stores)
            stores.append((ds.path, sample))
            if raw is not None:
                raw[sl] = ds.read(sample, normalized=False)
            if not scale:
                _check_unit_range(raw[sl] if raw is not None else ds.read(sample, normalized=False), ds.name, sample)
            start += n
    if not lows:
        lows, highs = [np.zeros(c, np.float32)], [np.ones(c, np.float32)]
    low = np.asarray(lows, np.float32)
    inv = (1.0 / (np.asarray(highs, np.float32) - low)).astype(np.float32)
    if conditions is not None and len(conditions) != len(index):
        raise ValueError(f"conditions has {len(conditions)} rows; the datasets have {len(index)} patches.")
    if not in_memory:
        logger.info("raw patches (%.1f GiB) exceed memory_budget_bytes (%.1f GiB): streaming from the store",
                    total / 2**30, memory_budget_bytes / 2**30)
    data = PatchData(index=index, group=group, low=low, inv=inv, scale=scale, conditions=conditions,
                     patch_shape=(h, w, c), raw=raw)
    if not in_memory:
        import zarr

        data.stores = stores
        data.block_of_row = block_of_row
        data.store_row = index["row"].to_numpy(np.int64)
        first = zarr.open_array(stores[0][0] / P.STORE_DIR / stores[0][1], mode="r")
        data.chunk_rows = int(first.chunks[0])
    return data


def _check_unit_range(raw: np.ndarray, dataset: str, sample: str) -> None:
    lo, hi = float(raw.min()), float(raw.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"dataset {dataset!r} was made with scale=False and sample {sample!r} has values in [{lo}, {hi}]; "
            "the model's Bernoulli likelihood needs patches in [0, 1]. Regenerate it with scale=True."
        )


def training_index(datasets: Sequence[P.PatchDataset]) -> pd.DataFrame:
    """Concatenate the patch indexes in training-row order (samples in dataset order, store order within)."""
    frames = []
    for ds in datasets:
        for sample in ds.samples:
            sub = ds.index[ds.index["sample"] == sample].sort_values("row", kind="stable")
            if not len(sub):
                continue
            if not np.array_equal(sub["row"].to_numpy(), np.arange(len(sub))):
                raise ValueError(f"dataset {ds.name!r}, sample {sample!r}: the index rows do not cover the store "
                                 "(0..n-1); regenerate the dataset.")
            frames.append(sub)
    index = pd.concat(frames, ignore_index=True)
    index["sample"] = index["sample"].astype(str)
    return index


def split_train_val(
    index: pd.DataFrame,
    *,
    validation_fraction: float = 0.2,
    seed: int = 0,
    split_by: Literal["object", "sample"] = "object",
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation row positions; neither is ever empty.

    ``split_by="object"``: within each (dataset, sample), ``round(fraction * n)`` objects (at least 1
    and at most n - 1 when n >= 2) go to validation. ``split_by="sample"``: whole samples, at least one
    in each split.
    """
    if not 0.0 < float(validation_fraction) < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be strictly between 0 and 1.")
    if len(index) < 2:
        raise ValueError(f"the datasets have {len(index)} patch(es); training needs at least 2 "
                         "(one for training, one for validation).")
    rng = np.random.default_rng([int(seed), 7])
    keys = index["dataset"].astype(str) + "\x00" + index["sample"].astype(str)
    _, groups = group_rows(keys.to_numpy())  # rows of each (dataset, sample), in order of first appearance
    val_parts: list[np.ndarray] = []
    if split_by == "sample":
        if len(groups) < 2:
            raise ValueError("split_by='sample' needs at least two samples; use split_by='object'.")
        order = rng.permutation(len(groups))
        n_val = min(max(int(round(validation_fraction * len(groups))), 1), len(groups) - 1)
        val_parts = [groups[i] for i in order[:n_val]]
    elif split_by == "object":
        for rows in groups:
            n = len(rows)
            if n < 2:
                continue
            n_val = min(max(int(round(validation_fraction * n)), 1), n - 1)
            val_parts.append(rng.choice(rows, size=n_val, replace=False))
        if not val_parts:  # every sample has one object: hold out whole samples
            order = rng.permutation(len(groups))
            n_val = min(max(int(round(validation_fraction * len(groups))), 1), len(groups) - 1)
            val_parts = [groups[i] for i in order[:n_val]]
    else:
        raise ValueError(f"split_by={split_by!r} is not valid; choose 'object' or 'sample'.")
    is_val = np.zeros(len(index), bool)
    is_val[np.concatenate(val_parts)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def dihedral(x: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Apply dihedral transform ``states[i]`` (0..7: ``k = s % 4`` quarter turns, mirrored if ``s >= 4``)."""
    out = x.copy()
    for s in np.unique(states):
        m = states == s
        sub = x[m]
        if s >= 4:
            sub = sub[:, :, ::-1]
        out[m] = np.rot90(sub, int(s) % 4, axes=(1, 2))
    return out


class PatchSequence(keras.utils.PyDataset):
    """Batches ``{"image": ..., ["condition": ...]}`` of ``positions`` of a :class:`PatchData`.

    Parameters
    ----------
    data
        The patches.
    positions
        Rows of ``data`` in this split.
    batch_size
        Patches per batch (the last batch may be smaller; no patch is dropped).
    shuffle, flip
        Seeded per-epoch permutation and dihedral augmentation (training split only).
    seed
        Seed of the order and the augmentation; batch ``i`` of epoch ``e`` depends only on (seed, e, i).
    workers
        Preparation threads (Keras PyDataset ``workers``).

    """

    def __init__(self, data: PatchData, positions: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 flip: bool = False, seed: int = 0, workers: int = 1) -> None:
        super().__init__(workers=max(int(workers), 1), use_multiprocessing=False,
                         max_queue_size=max(4, 2 * int(workers)))
        if len(positions) == 0:
            raise ValueError("a split has no patches.")
        self.data = data
        self.positions = np.asarray(positions, np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.flip = bool(flip)
        self.seed = int(seed)
        h, w, _ = data.patch_shape
        self.n_states = 8 if h == w else 4
        self.epoch = 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.positions
        rng = np.random.default_rng([self.seed, epoch, 1])
        if self.data.in_memory:
            return self.positions[rng.permutation(len(self.positions))]
        # Streaming: shuffle whole chunks, then rows within windows of a few chunks, so that a batch
        # touches few chunks and each chunk is decoded about once per epoch.
        pos = self.positions
        chunk_id = self.data.block_of_row[pos].astype(np.int64) * 1_000_000 + self.data.store_row[pos] // \
            self.data.chunk_rows
        uniq, inverse = np.unique(chunk_id, return_inverse=True)
        chunk_order = rng.permutation(len(uniq))
        rank = np.empty(len(uniq), np.int64)
        rank[chunk_order] = np.arange(len(uniq))
        window = rank[inverse] // max(self.data.cache_chunks // 4, 1)
        return pos[np.lexsort((rng.random(len(pos)), window))]

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0 or i >= len(self):
            raise IndexError(f"batch {i} out of range (0..{len(self) - 1}).")
        pos = self._order[i * self.batch_size:(i + 1) * self.batch_size]
        x = self.data.batch(pos)
        if self.flip:
            states = np.random.default_rng([self.seed, self.epoch, i, 2]).integers(0, 8, size=len(pos))
            if self.n_states == 4:
                states = states - states % 2  # 0, 2, 4, 6: the symmetries of a rectangle
            x = dihedral(x, states)
        out = {"image": x}
        if self.data.conditions is not None:
            out["condition"] = self.data.conditions[pos]
        return out

    def on_epoch_end(self) -> None:
        """Advance to the next epoch's order and augmentation draws."""
        # Called by Keras after the epoch's batches were consumed (the enqueuer is stopped first).
        self.epoch += 1
        self._order = self._make_order(self.epoch)


    def keras_input(self) -> Any:
        """Return what ``fit`` consumes (the PyDataset itself)."""
        return self


class TFPatchBatches:
    """The same batches as :class:`PatchSequence`, as a ``tf.data`` pipeline (TensorFlow backend, data in RAM).

    Gathering, normalization and the dihedral transforms run as TensorFlow ops in parallel map calls
    with prefetching, so no Python runs per batch (a Python ``PyDataset`` behind ``tf.data`` holds the
    GIL for every batch and halves the throughput of small models on two cores). The order is a seeded
    ``shuffle`` reshuffled every epoch and the transforms are drawn from a seeded
    ``tf.data.Dataset.random`` re-drawn every epoch: reproducible under the seed, but not the same
    draws as :class:`PatchSequence`.
    """

    def __init__(self, data: PatchData, positions: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 flip: bool = False, seed: int = 0, workers: int = 1) -> None:
        if not data.in_memory:
            raise ValueError("TFPatchBatches needs the patches in memory; use PatchSequence to stream from disk.")
        if len(positions) == 0:
            raise ValueError("a split has no patches.")
        self.data = data
        self.positions = np.asarray(positions, np.int64)
        self.batch_size = int(batch_size)
        self.shuffle, self.flip, self.seed = bool(shuffle), bool(flip), int(seed)
        self.workers = max(int(workers), 1)
        self._dataset = None

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def keras_input(self) -> Any:
        """Return the ``tf.data.Dataset`` that ``fit`` consumes (built once)."""
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    def _build(self) -> Any:
        import tensorflow as tf

        data = self.data
        h, w, _ = data.patch_shape
        raw_np = data.raw
        raw_dtype = tf.as_dtype(raw_np.dtype)
        low = tf.constant(data.low[data.group] if data.scale else np.zeros((len(data), data.low.shape[1]),
                                                                               np.float32))
        inv = tf.constant(data.inv[data.group] if data.scale else np.ones((len(data), data.low.shape[1]),
                                                                              np.float32))
        cond = tf.constant(data.conditions) if data.conditions is not None else None
        scale = data.scale
        square = h == w

        ds = tf.data.Dataset.from_tensor_slices(self.positions)
        if self.shuffle:
            ds = ds.shuffle(len(self.positions), seed=self.seed, reshuffle_each_iteration=True)
        ds = ds.batch(self.batch_size)
        if self.flip:
            rand = tf.data.Dataset.random(seed=self.seed + 1, rerandomize_each_iteration=True).batch(self.batch_size)
            ds = tf.data.Dataset.zip((ds, rand))
        else:
            ds = ds.map(lambda p: (p, tf.zeros_like(p)))

        def make(pos, r):
            # The raw patches stay in the numpy array (no TensorFlow copy of a multi-GB array); the
            # gather is one short numpy call per batch, everything after it is graph ops.
            x = tf.numpy_function(lambda p: raw_np[p], [pos], raw_dtype, stateful=False)
            x = tf.cast(tf.ensure_shape(x, (None, *data.patch_shape)), tf.float32)
            if scale:
                x = (x - tf.gather(low, pos)[:, None, None, :]) * tf.gather(inv, pos)[:, None, None, :]
                x = tf.clip_by_value(x, 0.0, 1.0)
            if self.flip:
                states = tf.math.floormod(r[: tf.shape(pos)[0]], 8)
                x = _tf_dihedral(x, states, square)
            out = {"image": x}
            if cond is not None:
                out["condition"] = tf.gather(cond, pos)
            return out

        ds = ds.map(make, num_parallel_calls=max(self.workers, 2), deterministic=True)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(2)


def _tf_dihedral(x: Any, states: Any, square: bool) -> Any:
    """Apply the dihedral transform ``states[i]`` (as :func:`dihedral`) to each image, in TensorFlow."""
    import tensorflow as tf

    if not square:
        states = states - tf.math.floormod(states, 2)  # 0, 2, 4, 6: the symmetries of a rectangle
    mirror = states >= 4
    x = tf.where(mirror[:, None, None, None], tf.reverse(x, axis=[2]), x)
    k = tf.math.floormod(states, 4)
    rot1 = tf.reverse(tf.transpose(x, [0, 2, 1, 3]), axis=[1]) if square else x  # np.rot90(k=1, axes=(1, 2))
    rot2 = tf.reverse(x, axis=[1, 2])
    rot3 = tf.reverse(tf.transpose(x, [0, 2, 1, 3]), axis=[2]) if square else x
    sel = k[:, None, None, None]
    return tf.where(sel == 0, x, tf.where(sel == 1, rot1, tf.where(sel == 2, rot2, rot3)))


def make_batches(data: PatchData, positions: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 flip: bool = False, seed: int = 0, workers: int = 1) -> PatchSequence | TFPatchBatches:
    """:class:`TFPatchBatches` with the TensorFlow backend and the patches in RAM, else :class:`PatchSequence`."""
    kw = dict(batch_size=batch_size, shuffle=shuffle, flip=flip, seed=seed, workers=workers)
    if keras.backend.backend() == "tensorflow" and data.in_memory:
        return TFPatchBatches(data, positions, **kw)
    return PatchSequence(data, positions, **kw)


# --------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------


def save_model_atomic(model: keras.Model, path: str | Path) -> Path:
    """``model.save(path)`` through a temporary sibling file, so ``path`` is always a complete model."""
    from ._io import atomic_file

    with atomic_file(path) as tmp:
        model.save(tmp)
    return Path(path)


class BestCheckpoint(keras.callbacks.Callback):
    """Write the model to ``path`` (atomically) whenever ``monitor`` improves.

    Beside it, ``<stem>.json`` records the checkpoint's epoch (1-based), the monitored value, the learning
    rate and the SHA-1 of the ``.keras`` file, so :func:`checkpoint_state` can tell which epoch a
    checkpoint holds after a crash (resuming continues from there).
    """

    def __init__(self, path: str | Path, monitor: str = "val_loss", best: float = np.inf) -> None:
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.best = float(best)
        self.best_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and value < self.best:
            self.best, self.best_epoch = float(value), epoch
            save_model_atomic(self.model, self.path)
            lr = self.model.optimizer.learning_rate
            write_json_atomic(self.path.with_suffix(".json"), {
                "epoch": epoch + 1, self.monitor: float(value), "monitor": self.monitor,
                "learning_rate": float(lr.numpy() if hasattr(lr, "numpy") else lr), "sha1": _sha1(self.path)})


def _sha1(path: Path) -> str:
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_state(model_dir: str | Path, checkpoint: str = "checkpoint.keras") -> dict[str, Any]:
    """Where an interrupted training stands: the best checkpoint's epoch, value and the history up to it.

    Returns ``{"path", "epoch" (1-based), "val_loss", "learning_rate", "history"}``. The epoch comes from
    the checkpoint's ``.json`` record when its SHA-1 matches the ``.keras`` file; a process killed
    between writing the two leaves a newer checkpoint, which is then the best epoch of ``history.json``
    (written before the checkpoint in every epoch). Raises ``FileNotFoundError`` without a checkpoint.
    """
    folder = Path(model_dir)
    path = folder / checkpoint
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint {str(path)!r} to resume from; train without resume first.")
    history_path = folder / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    record_path = path.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    val = history.get("val_loss") or []
    if record.get("sha1") == _sha1(path):
        epoch = int(record["epoch"])
    elif val:
        epoch = int(np.nanargmin(val)) + 1
    else:
        raise ValueError(f"cannot tell which epoch {str(path)!r} holds: no matching record and no history.json.")
    history = {k: list(v[:epoch]) for k, v in history.items()}
    lrs = history.get("learning_rate") or []
    return {"path": path, "epoch": epoch,
            "val_loss": float(val[epoch - 1]) if len(val) >= epoch else float(record.get("val_loss", np.inf)),
            "learning_rate": float(record.get("learning_rate", lrs[-1] if lrs else np.nan)), "history": history}


class HistoryRecorder(keras.callbacks.Callback):
    """Metrics per epoch, saved after each epoch.

    Adds the learning rate used in the epoch, ``epoch_seconds`` (training pass, validation pass and
    callbacks), ``train_seconds`` (training pass only) and ``train_patches_per_s`` (training pass).
    """

    def __init__(self, folder: str | Path | None, n_train: int,
                 history: Mapping[str, Sequence[float]] | None = None) -> None:
        super().__init__()
        self.folder = Path(folder) if folder is not None else None
        self.n_train = n_train
        self.history: dict[str, list[float]] = {k: list(v) for k, v in (history or {}).items()}
        self._t0 = 0.0
        self._lr = float("nan")

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()
        self._train_end: float | None = None
        lr = self.model.optimizer.learning_rate
        self._lr = float(lr.numpy() if hasattr(lr, "numpy") else lr)

    def on_test_begin(self, logs: dict | None = None) -> None:
        if self._train_end is None:  # the validation pass of this epoch starts: the training pass is over
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        seconds = now - self._t0
        train_seconds = (self._train_end or now) - self._t0
        row = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        row["learning_rate"] = self._lr
        row["epoch"] = float(epoch + 1)
        row["epoch_seconds"] = seconds
        row["train_seconds"] = train_seconds
        row["train_patches_per_s"] = self.n_train / train_seconds if train_seconds > 0 else float("nan")
        for key, value in row.items():
            self.history.setdefault(key, []).append(value)
        if self.folder is not None:
            write_history(self.history, self.folder)


def write_history(history: Mapping[str, Sequence[float]], folder: str | Path) -> None:
    """``history.json`` and ``history.csv`` (one row per epoch), atomically."""
    folder = Path(folder)
    write_json_atomic(folder / "history.json", {k: list(v) for k, v in history.items()})
    write_text_atomic(folder / "history.csv", pd.DataFrame(dict(history)).to_csv(index=False))


# --------------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------------


def fit(
    model: keras.Model,
    train: PatchSequence | TFPatchBatches,
    val: PatchSequence | TFPatchBatches,
    *,
    model_dir: str | Path,
    log_dir: str | Path | None,
    n_epochs: int = 100,
    learning_rate: float = 1e-3,
    min_learning_rate: float = 1e-4,
    factor_learning_rate: float = 0.2,
    learning_rate_patience: int = 3,
    early_stopping_patience: int = 5,
    seed: int = 0,
    verbose: int | str = "auto",
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    resume_from: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Compile (Adam) and fit ``model``; returns the history dict and the best epoch.

    ``resume_from`` (a :func:`checkpoint_state` whose weights ``model`` already holds) continues an
    interrupted training: epochs are numbered on from the checkpoint's epoch up to ``n_epochs`` in all,
    the history is kept, the learning rate is the one of the checkpoint's epoch and the checkpoint is only
    replaced by a better epoch. Adam's moments and the plateau/early-stopping counters start afresh.

    Writes ``model_dir/checkpoint.keras`` (best so far), ``history.json``/``history.csv`` (every
    epoch) and TensorBoard event files under ``log_dir``. The best weights are restored at the end.
    ``on_epoch_end(epoch, metrics)`` is called after every epoch (1-based) with that epoch's row of the
    history (losses, validation losses, learning rate, timings), e.g. to log metrics while training runs.
    """
    for name, value in (("n_epochs", n_epochs), ("learning_rate_patience", learning_rate_patience),
                        ("early_stopping_patience", early_stopping_patience)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (1 if name == "n_epochs"
                                                                                             else 0):
            raise ValueError(f"{name}={value!r} must be an int >= {1 if name == 'n_epochs' else 0}.")
    if not learning_rate > 0 or not min_learning_rate >= 0:
        raise ValueError(f"learning_rate={learning_rate!r} must be > 0 and min_learning_rate={min_learning_rate!r} "
                         ">= 0.")
    if not 0 < factor_learning_rate < 1:
        raise ValueError(f"factor_learning_rate={factor_learning_rate!r} must be strictly between 0 and 1.")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    initial_epoch = int(resume_from["epoch"]) if resume_from else 0
    keras.utils.set_random_seed(int(seed) + initial_epoch)
    lr0 = float(resume_from["learning_rate"]) if resume_from and np.isfinite(resume_from["learning_rate"]) \
        else learning_rate
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr0))
    recorder = HistoryRecorder(model_dir, n_train=len(train.positions),
                               history=resume_from["history"] if resume_from else None)
    checkpoint = BestCheckpoint(model_dir / "checkpoint.keras",
                                best=resume_from["val_loss"] if resume_from else np.inf)
    callbacks: list[keras.callbacks.Callback] = [
        recorder,
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=factor_learning_rate,
                                          patience=learning_rate_patience, min_lr=min_learning_rate),
        checkpoint,
    ]
    if log_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False))
    if on_epoch_end is not None:  # last, so the recorder's row for the epoch is complete
        callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch_end(
            epoch + 1, {k: float(v[-1]) for k, v in recorder.history.items() if len(v) and k != "epoch"})))
    t0 = time.perf_counter()
    if initial_epoch < int(n_epochs):
        model.fit(train.keras_input(), validation_data=val.keras_input(), epochs=int(n_epochs),
                  initial_epoch=initial_epoch, callbacks=callbacks, shuffle=False, verbose=verbose)
    if resume_from and checkpoint.best_epoch is None:  # no epoch beat the checkpoint: it stays the result
        best_model = keras.saving.load_model(resume_from["path"], safe_mode=True, compile=False)
        model.set_weights(best_model.get_weights())
    seconds = time.perf_counter() - t0
    history = recorder.history
    best = int(np.nanargmin(history["val_loss"])) + 1 if history.get("val_loss") else None
    logger.info("trained %d epochs in %.1f s; best epoch %s (val_loss %.4g)", len(history.get("loss", [])),
                seconds, best, checkpoint.best)
    return {"history": history, "best_epoch": best, "seconds": seconds}


def predict_z_mean(model: keras.Model, data: PatchData, positions: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """``z_mean`` of the (unaugmented) patches at ``positions`` of ``data``."""
    out = []
    for start in range(0, len(positions), batch_size):
        pos = positions[start:start + batch_size]
        x = data.batch(pos)
        inputs = [x, data.conditions[pos]] if model.conditional else x
        out.append(np.asarray(model.encoder.predict_on_batch(inputs)[0], np.float32))
    return np.concatenate(out) if out else np.zeros((0, model.n_latent_dim), np.float32)


def reconstruct(model: keras.Model, data: PatchData, positions: np.ndarray, batch_size: int = 256) -> tuple:
    """Return (inputs, reconstructions from ``z_mean``) of the patches at ``positions`` (deterministic)."""
    xs, rs = [], []
    for start in range(0, len(positions), batch_size):
        pos = positions[start:start + batch_size]
        x = data.batch(pos)
        cond = data.conditions[pos] if model.conditional else None
        z_mean, _ = model.encode({"image": x, "condition": cond} if cond is not None else x)
        r = model.decode(z_mean, cond)
        xs.append(x)
        rs.append(np.asarray(keras.ops.convert_to_numpy(r), np.float32))
    return np.concatenate(xs), np.concatenate(rs)
