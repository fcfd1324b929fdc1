"""Training: input pipeline from the patch store, split, callbacks, checkpoints, metrics history.

Input pipeline and memory
    Raw patches stay in the store's dtype (uint8/uint16: 4 KiB per 32x32x4 uint8 patch). When they fit
    ``memory_budget_bytes`` (default :data:`DEFAULT_MEMORY_BUDGET`, 1 GiB) every sample is read once,
    sequentially, into RAM; otherwise they stay on disk and are read in whole zarr chunks through a
    least-recently-used cache of at most ``memory_budget_bytes`` and at most two shuffle windows
    (about 520 MiB), the next window's chunks being decoded in a background thread. Peak memory is thus
    bounded by the budget, not by the plate: per object only the compact index (about 30 bytes plus the
    object name) and the condition rows are kept. Batches are gathered in one short numpy call, then
    normalized with the dataset's stored anchors (``(v - low) / (high - low)`` clipped to [0, 1], per
    sample or global as the dataset was made) and augmented as TensorFlow ops in a prefetching
    ``tf.data`` pipeline, so batch preparation runs on one core while the model trains on the other
    (``n_workers > 1`` adds preparation threads).

Split
    By object within each (dataset, sample): a seeded ``validation_fraction`` of every sample's
    objects is held out, at least one object per split whenever the sample has two or more. With
    ``split_by="sample"`` whole samples are held out instead (for many samples, to measure
    generalization to new wells); both splits are then still never empty.

Augmentation and order
    Training batches only: with ``flip=True`` each patch gets one of the 8 dihedral transforms
    (rotations by 0/90/180/270 degrees, with or without a mirror; 4 for non-square patches), drawn
    from ``(seed, epoch, batch)``; with ``shuffle=True`` the training order is a seeded chunk-wise
    shuffle per epoch (:func:`batch_plan`: store chunks in random order, rows shuffled within windows
    of about :data:`SHUFFLE_WINDOW_BYTES`; a split under one window is uniformly permuted). The order
    does not depend on the memory budget: in RAM or streamed, a seed gives the same batches.
    Validation batches are neither shuffled nor augmented.

Callbacks (:func:`fit`)
    EarlyStopping on ``val_loss`` with the best weights restored, ReduceLROnPlateau, TensorBoard
    event files, a best-so-far checkpoint ``checkpoint.keras`` written atomically whenever
    ``val_loss`` improves, and the metrics history (``loss``, ``reconstruction_loss``, ``kl_loss``,
    their ``val_*``, ``learning_rate`` used in the epoch, epoch seconds and patches/s) written to
    ``history.json`` and ``history.csv`` after every epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from . import patches as P
from ._backend import keras
from ._grouping import group_rows
from .io import write_json_atomic, write_text_atomic
from .parallel import process_cores

logger = logging.getLogger(__name__)

__all__ = [
    "BatchPlan",
    "configure_tensorflow",
    "dtype_policy",
    "mixed_precision_policy",
    "PatchData",
    "PatchSequence",
    "TrainedModel",
    "check_datasets",
    "TFPatchBatches",
    "batch_plan",
    "fit",
    "load_model",
    "load_patch_data",
    "make_batches",
    "prepare",
    "split_train_val",
    "train",
]

#: Default memory budget: raw patches up to this size are held in RAM during training; larger sets are
#: streamed from the store through a chunk cache of at most this size.
DEFAULT_MEMORY_BUDGET = 2**30
#: Training rows are shuffled within windows of whole store chunks of about this many raw bytes.
SHUFFLE_WINDOW_BYTES = 256 * 2**20
#: Training steps per call into the compiled graph (Keras ``steps_per_execution``); the losses are the same.
STEPS_PER_EXECUTION = 8
#: Environment variable that chooses the mixed precision: ``auto`` (default), ``1``, ``0`` or a policy.
MIXED_PRECISION_ENV = "PHENOCODER_MIXED_PRECISION"
_SETTING_KEYS = ("patch_size", "channels", "spatial_key_index", "store_dtype")
_NORM_KEYS = ("scale", "scale_per_sample", "scale_percentile")


# --------------------------------------------------------------------------------------------------
# TensorFlow runtime
# --------------------------------------------------------------------------------------------------


def configure_tensorflow(threads: int | None = None) -> dict[str, Any]:
    """Size TensorFlow's thread pools to the cores this process may use; return the settings in force.

    TensorFlow sizes its intra-op pool (the threads of one convolution) and inter-op pool (independent ops
    run concurrently) from the host's core count, which in a container or under ``taskset`` can be far more
    than the cores the process gets: the threads then time-slice and a step waits for the slowest one.
    Both pools are set to ``threads`` (default: :func:`process_cores`) unless the ``TF_NUM_INTRAOP_THREADS``
    / ``TF_NUM_INTEROP_THREADS`` environment variables say otherwise. The pools are fixed once TensorFlow
    has run its first op: a later call changes nothing and reports what is in force. XLA (``jit_compile``)
    stays Keras's ``"auto"``: on for GPUs, off on CPUs, where measured training with XLA was 3-4x slower
    than oneDNN's kernels (``benchmarks/train_speed.py``).

    Parameters
    ----------
    threads
        Threads of both pools; ``None`` (default) uses :func:`process_cores`. The environment variables
        ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` take precedence over it.

    Returns
    -------
    dict
        The settings in force: ``intra_op_threads`` and ``inter_op_threads`` (0 means TensorFlow's own
        choice), ``gpus`` (GPUs visible to TensorFlow) and ``jit_compile`` (``"auto"``).
    """
    import tensorflow as tf

    n = int(threads) if threads is not None else process_cores()
    intra = int(os.environ.get("TF_NUM_INTRAOP_THREADS", n))
    inter = int(os.environ.get("TF_NUM_INTEROP_THREADS", n))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # the runtime already started: its pools stay as they are
        logger.debug("TensorFlow already initialized; thread pools left as they are")
    return {"intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "gpus": len(tf.config.list_physical_devices("GPU")), "jit_compile": "auto"}


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``; empty where it cannot be read).

    Returns
    -------
    set of str
        Flags such as ``"avx512f"``, ``"avx512_bf16"``, ``"amx_bf16"`` (lower case).
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def mixed_precision_policy() -> str:
    """The Keras dtype policy :func:`prepare` builds models under.

    By default (``PHENOCODER_MIXED_PRECISION`` unset or ``auto``): ``"mixed_float16"`` on a GPU of compute
    capability 7.0 or higher (Keras then scales the loss), else ``"float32"``. On a CPU, bfloat16 is opt-in:
    on the 2-core AVX512_BF16 development machine it trained 1.10-1.13x faster per CPU-second but ended 10
    epochs on the real plate with a 1.6-3.3 % higher validation loss (two seeds), more than the seeds differ.

    The environment variable ``PHENOCODER_MIXED_PRECISION`` sets the choice: ``1`` (or ``on``/``true``/``yes``)
    uses the hardware's mixed precision, ``"mixed_bfloat16"`` on a CPU with bfloat16 instructions
    (``avx512_bf16`` or ``amx_bf16`` in ``/proc/cpuinfo``) and ``"mixed_float16"`` on such a GPU; ``0`` (or
    ``off``/``false``/``no``/``float32``) trains in float32 everywhere; ``bfloat16``/``float16`` (or the
    ``mixed_`` names) force that policy. Mixed policies compute the layers in 16 bits and keep the weights and
    the loss in float32 (:meth:`~phenocoder_lib.models.CVAE.compute_loss`).

    Returns
    -------
    str
        ``"mixed_float16"``, ``"mixed_bfloat16"`` or ``"float32"``.

    Raises
    ------
    ValueError
        An unknown value of ``PHENOCODER_MIXED_PRECISION``.
    """
    value = os.environ.get(MIXED_PRECISION_ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no", "float32"):
        return "float32"
    if value in ("bfloat16", "mixed_bfloat16", "float16", "mixed_float16"):
        return value if value.startswith("mixed_") else f"mixed_{value}"
    if value not in ("", "auto", "1", "on", "true", "yes"):
        raise ValueError(f"{MIXED_PRECISION_ENV}={value!r} is not valid; use auto (default: mixed_float16 on a GPU, "
                         "float32 on a CPU), 1 (also bfloat16 on a CPU that has it), 0 (float32), bfloat16 or "
                         "float16.")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return "mixed_float16" if tuple(details.get("compute_capability", (0, 0))) >= (7, 0) else "float32"
    if value in ("", "auto"):
        return "float32"
    return "mixed_bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[str]:
    """Build Keras layers under the dtype policy ``name``, then restore the global policy.

    A layer keeps the policy in force when it is made, so models built inside compute under ``name``
    while the process's global policy is unchanged afterwards.

    Parameters
    ----------
    name
        A Keras dtype policy (``"float32"``, ``"mixed_bfloat16"``, ``"mixed_float16"``).

    Yields
    ------
    str
        ``name``.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(previous)


def compile_model(model: keras.Model, learning_rate: float, *,
                  steps_per_execution: int = STEPS_PER_EXECUTION) -> None:
    """Compile ``model`` with Adam the way :func:`fit` does (XLA left to Keras: on with a GPU, off on CPU).

    Parameters
    ----------
    model
        The model to compile (its loss comes from its own ``compute_loss``). A model built under
        ``mixed_float16`` gets Keras's loss scaling.
    learning_rate
        Adam's initial learning rate (> 0).
    steps_per_execution
        Training (and validation) steps per call into the compiled graph (default
        :data:`STEPS_PER_EXECUTION`): fewer Python round trips per epoch, the same steps and losses.
    """
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate), jit_compile="auto",
                  steps_per_execution=int(steps_per_execution))


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------


def check_datasets(datasets: Sequence[P.PatchDataset], input_shape: Sequence[int]) -> dict[str, Any]:
    """Check that the datasets agree with each other and with ``input_shape``; return the first's settings.

    Parameters
    ----------
    datasets
        The training patch datasets; all must share ``patch_size``, ``channels``, ``spatial_key_index``,
        ``store_dtype`` and the normalization settings (``scale``, ``scale_per_sample``,
        ``scale_percentile``).
    input_shape
        The model's ``(height, width, channels)``; height and width must equal the datasets'
        ``patch_size`` and channels their channel count.

    Returns
    -------
    dict
        The first dataset's ``settings`` (``settings.json``: patch geometry, channels, normalization).

    Raises
    ------
    ValueError
        No dataset, datasets that disagree, or an ``input_shape`` that does not match them; the message
        names the argument and the fix (raised before anything is trained).
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


class _ChunkCache:
    """Decoded store chunks, least recently used out first, never more than ``max_bytes`` in all.

    ``get`` returns a chunk (decoding it when absent; a chunk larger than ``max_bytes`` is returned but
    not kept); ``prefetch`` decodes chunks in one background thread ahead of their use. Thread-safe: the
    tf.data pipeline gathers batches in parallel map calls.
    """

    def __init__(self, load: Callable[[int], np.ndarray], max_bytes: int) -> None:
        self._load = load
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.peak_nbytes = 0
        self.n_loads = 0
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, key: int) -> np.ndarray:
        """Chunk ``key``, from the cache, from a pending prefetch, or decoded now."""
        with self._lock:
            arr = self._chunks.get(key)
            if arr is not None:
                self._chunks.move_to_end(key)
                return arr
            pending = self._pending.get(key)
        return pending.result() if pending is not None else self._fetch(key)

    def prefetch(self, keys: Sequence[int]) -> None:
        """Decode ``keys`` (in order) in the background unless cached or already on their way."""
        with self._lock:
            todo = [k for k in keys if k not in self._chunks and k not in self._pending]
            if todo and self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="phenocoder-chunks")
            for key in todo:
                self._pending[key] = self._pool.submit(self._fetch, key)

    def _fetch(self, key: int) -> np.ndarray:
        try:
            arr = self._load(key)
        finally:
            with self._lock:
                self._pending.pop(key, None)
        with self._lock:
            self.n_loads += 1
            if key not in self._chunks and arr.nbytes <= self.max_bytes:
                while self._chunks and self.nbytes + arr.nbytes > self.max_bytes:
                    _, old = self._chunks.popitem(last=False)
                    self.nbytes -= old.nbytes
                self._chunks[key] = arr
                self.nbytes += arr.nbytes
                self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        return arr


@dataclass
class PatchData:
    """All training patches of a model: raw values (in RAM or streamed from the store), anchors, conditions.

    Rows follow ``index`` (datasets in order, samples in dataset order, store order within a sample): a
    block of consecutive rows per (dataset, sample), rows ``block_start[b]:block_start[b + 1]`` being the
    rows of the store ``stores[b]`` in order. Per row only ``index`` and ``conditions`` ((n, width) or
    None) are kept; blocks carry the anchor group (``block_group``, into ``low``/``inv``) and the store's
    chunk length (``chunk_rows``, an int or one per block).

    With ``raw`` None the patches are read from the store in whole chunks through a least-recently-used
    cache of at most ``cache_bytes`` decoded bytes. The store chunks also define the training order
    (see :func:`batch_plan`), in memory or not, so both give the same batches.

    Parameters
    ----------
    index
        The compact patch index, one row per patch in training-row order (columns such as ``dataset``,
        ``sample``, the object id, ``z``, ``y``, ``x``; see :func:`load_patch_data`).
    low
        Low intensity anchors, float32 ``(n_groups, C)``: one row per anchor group (per sample or one for
        all, as the datasets were made).
    inv
        ``1 / (high - low)`` of the same anchor groups, float32 ``(n_groups, C)``.
    scale
        Whether patches are normalized as ``clip((v - low) * inv, 0, 1)``; ``False``: the raw values are
        used as they are (already in [0, 1]).
    conditions
        Condition vectors, float32 ``(n, width)`` with one row per patch, or ``None`` for a plain CVAE.
    patch_shape
        ``(height, width, channels)`` of one patch.
    dtype
        The store's dtype of the raw patches (``uint8``, ``uint16`` or a float type).
    stores
        ``(dataset folder, sample)`` of every block: where the block's zarr store is read from.
    block_start
        First row of every block and the total row count, int64 ``(n_blocks + 1,)``.
    block_group
        Anchor group (row of ``low``/``inv``) of every block, int32 ``(n_blocks,)``.
    chunk_rows
        Rows per store chunk: one int for all blocks or one per block (default: the patch writer's
        chunk length).
    raw
        All raw patches ``(n, H, W, C)`` in RAM, or ``None`` to stream them from the stores.
    cache_bytes
        Bytes of decoded chunks the streaming cache may hold (default 1 GiB).
    shuffle_window_bytes
        Raw bytes of one shuffle window (rounded to whole chunks); 0 (default) means
        :data:`SHUFFLE_WINDOW_BYTES`.
    """

    index: pd.DataFrame
    low: np.ndarray
    inv: np.ndarray
    scale: bool
    conditions: np.ndarray | None
    patch_shape: tuple[int, int, int]
    dtype: np.dtype
    stores: list[tuple[Path, str]]
    block_start: np.ndarray
    block_group: np.ndarray
    chunk_rows: np.ndarray | int = P._CHUNK_ROWS
    raw: np.ndarray | None = None
    cache_bytes: int = 2**30
    shuffle_window_bytes: int = 0  # 0: SHUFFLE_WINDOW_BYTES

    def __post_init__(self) -> None:
        self.dtype = np.dtype(self.dtype)
        self.block_start = np.asarray(self.block_start, np.int64)
        self.block_group = np.asarray(self.block_group, np.int32)
        self._cache = _ChunkCache(self._load_chunk, self.cache_bytes)
        self._arrays: dict[int, Any] = {}
        self._tensors: dict[str, Any] = {}

    def __len__(self) -> int:
        return int(self.block_start[-1])

    @property
    def in_memory(self) -> bool:
        """Whether the raw patches are held in RAM."""
        return self.raw is not None

    @property
    def patch_bytes(self) -> int:
        """Bytes of one raw patch."""
        return int(np.prod(self.patch_shape)) * self.dtype.itemsize

    @property
    def window_chunks(self) -> int:
        """Store chunks per shuffle window (whole chunks of about ``SHUFFLE_WINDOW_BYTES``, at least one)."""
        chunk_bytes = int(np.max(self._layout()[0])) * self.patch_bytes
        return max(int(self.shuffle_window_bytes or SHUFFLE_WINDOW_BYTES) // max(chunk_bytes, 1), 1)

    def block_of(self, pos: np.ndarray) -> np.ndarray:
        """Block (dataset, sample) of rows ``pos``.

        Parameters
        ----------
        pos
            Row positions (ints in ``[0, len(self))``).

        Returns
        -------
        numpy.ndarray
            The block of every row (index into ``block_start``/``stores``), same shape as ``pos``.
        """
        return np.searchsorted(self.block_start, pos, side="right") - 1

    def group_of(self, pos: np.ndarray) -> np.ndarray:
        """Anchor group (row of ``low``/``inv``) of rows ``pos``.

        Parameters
        ----------
        pos
            Row positions (ints in ``[0, len(self))``).

        Returns
        -------
        numpy.ndarray
            The anchor group of every row, int32, same shape as ``pos``.
        """
        return self.block_group[self.block_of(pos)]

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows per chunk of every block and the global id of every block's first chunk (n_blocks + 1)."""
        n_blocks = len(self.block_start) - 1
        rows = np.broadcast_to(np.asarray(self.chunk_rows, np.int64), (n_blocks,))
        n_chunks = -(-np.diff(self.block_start) // rows)
        return rows, np.concatenate([[0], np.cumsum(n_chunks)])

    def chunk_of(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global store chunk of rows ``pos`` and their row within the chunk.

        Parameters
        ----------
        pos
            Row positions (ints in ``[0, len(self))``).

        Returns
        -------
        tuple of numpy.ndarray
            ``(chunk, offset)``, int64 like ``pos``: the chunk's global id (chunks numbered block after
            block) and the row inside that chunk.
        """
        rows, base = self._layout()
        block = self.block_of(pos)
        local = np.asarray(pos, np.int64) - self.block_start[block]
        per = rows[block]
        return base[block] + local // per, local % per

    def raw_rows(self, pos: np.ndarray, plan: BatchPlan | None = None) -> np.ndarray:
        """Raw patches of rows ``pos`` (in the given order); ``plan`` lets the cache prefetch the next window.

        Parameters
        ----------
        pos
            Row positions, in the order wanted.
        plan
            The epoch's :class:`BatchPlan`; when streaming, the chunk cache then starts decoding the
            window after the latest one these rows touch. ``None``: no prefetch.

        Returns
        -------
        numpy.ndarray
            The raw patches ``(len(pos), H, W, C)`` in the store's dtype (a copy).
        """
        if self.raw is not None:
            return self.raw[pos]
        chunk, offset = self.chunk_of(pos)
        keys, inverse = np.unique(chunk, return_inverse=True)
        if plan is not None:
            self._prefetch_after(plan, keys)
        out = np.empty((len(pos), *self.patch_shape), self.dtype)
        by_chunk = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[by_chunk], np.arange(len(keys) + 1))
        for j, key in enumerate(keys.tolist()):
            sel = by_chunk[bounds[j]:bounds[j + 1]]
            out[sel] = self._cache.get(key)[offset[sel]]
        return out

    def raw_tensor(self) -> Any:
        """The in-memory raw patches as a TensorFlow tensor that shares their memory (made once).

        The tensor is built through DLPack on ``raw``'s buffer, so the patches are held once (the memory
        budget counts them once). An array that is not 64-byte aligned or not C-contiguous (TensorFlow's
        requirement), or read-only (DLPack cannot export it), is first replaced by an aligned copy.

        Returns
        -------
        tf.Tensor
            ``(n, H, W, C)`` in the store's dtype, on the CPU.

        Raises
        ------
        ValueError
            The patches are streamed (``raw`` is ``None``).
        """
        if self.raw is None:
            raise ValueError("the patches are streamed from the store (raw is None); no tensor of them is held.")
        tensor = self._tensors.get("raw")
        if tensor is None:
            import tensorflow as tf

            if self.raw.ctypes.data % 64 or not self.raw.flags.c_contiguous or not self.raw.flags.writeable:
                aligned = aligned_empty(self.raw.shape, self.raw.dtype)
                aligned[...] = self.raw
                self.raw = aligned
            if self.raw.size == 0:
                tensor = tf.zeros(self.raw.shape, tf.as_dtype(self.raw.dtype))
            else:
                tensor = tf.experimental.dlpack.from_dlpack(self.raw.__dlpack__())
            self._tensors["raw"] = tensor
        return tensor

    def _prefetch_after(self, plan: BatchPlan, keys: np.ndarray) -> None:
        """Decode the chunks of the window after the latest one ``keys`` touch, as far as the cache holds them."""
        nxt = int(plan.window_of_chunk[keys].max()) + 1
        if nxt < plan.next_prefetch or nxt >= len(plan.windows):
            return
        plan.next_prefetch = nxt + 1
        chunk_bytes = int(np.max(self._layout()[0])) * self.patch_bytes
        room = self._cache.max_bytes // max(chunk_bytes, 1) - len(plan.windows[nxt - 1])
        if room > 0:
            self._cache.prefetch(plan.windows[nxt][:room].tolist())

    def start(self, plan: BatchPlan) -> None:
        """Begin decoding the first window of ``plan`` (streaming only).

        Parameters
        ----------
        plan
            The epoch's :class:`BatchPlan`; its first window's chunks are decoded in the background, as
            many as the chunk cache holds. Nothing happens when the patches are in RAM.
        """
        if self.raw is None and plan.windows:
            plan.next_prefetch = 1
            chunk_bytes = int(np.max(self._layout()[0])) * self.patch_bytes
            self._cache.prefetch(plan.windows[0][:max(self._cache.max_bytes // max(chunk_bytes, 1), 0)].tolist())

    def _load_chunk(self, key: int) -> np.ndarray:
        import zarr

        rows, base = self._layout()
        block = int(np.searchsorted(base, key, side="right") - 1)
        lo = self.block_start[block] + (key - base[block]) * rows[block]
        hi = min(lo + rows[block], self.block_start[block + 1])
        arr = self._arrays.get(block)
        if arr is None:
            folder, sample = self.stores[block]
            arr = self._arrays[block] = zarr.open_array(folder / P.STORE_DIR / sample, mode="r")
        start = int(lo - self.block_start[block])
        return np.asarray(arr[start:start + int(hi - lo)])

    def normalize(self, raw: np.ndarray, group: np.ndarray) -> np.ndarray:
        """Normalized float32 patches of ``raw`` patches whose anchor groups are ``group``.

        Parameters
        ----------
        raw
            Raw patches ``(b, H, W, C)`` in the store's dtype.
        group
            Anchor group (row of ``low``/``inv``) of every patch, ``(b,)``.

        Returns
        -------
        numpy.ndarray
            float32 ``(b, H, W, C)``: ``clip((raw - low) * inv, 0, 1)`` with ``scale``, else ``raw`` as float32.
        """
        x = raw.astype(np.float32)
        if self.scale:
            x -= self.low[group][:, None, None, :]
            x *= self.inv[group][:, None, None, :]
            np.clip(x, 0.0, 1.0, out=x)
        return x

    def batch(self, pos: np.ndarray, plan: BatchPlan | None = None) -> np.ndarray:
        """Return normalized float32 patches (len(pos), h, w, c) of rows ``pos``.

        Parameters
        ----------
        pos
            Row positions, in the order wanted.
        plan
            The epoch's :class:`BatchPlan` for the streaming prefetch (see :meth:`raw_rows`), or ``None``.

        Returns
        -------
        numpy.ndarray
            float32 ``(len(pos), H, W, C)`` in [0, 1] (unaugmented).
        """
        return self.normalize(self.raw_rows(pos, plan), self.group_of(pos))


def load_patch_data(
    datasets: Sequence[P.PatchDataset],
    *,
    conditions: np.ndarray | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> PatchData:
    """Read the raw patches of every dataset (one sequential read per sample) into a :class:`PatchData`.

    ``conditions`` must have one row per row of the concatenated dataset indexes (see
    :func:`training_index`). When the raw patches exceed ``memory_budget_bytes`` they stay on disk and
    are read in whole store chunks through a cache of at most ``memory_budget_bytes`` and at most two
    shuffle windows (``2 * SHUFFLE_WINDOW_BYTES`` plus two chunks); the batches are the same either way.

    Parameters
    ----------
    datasets
        The training patch datasets (checked with :func:`check_datasets`); their non-empty samples become
        the blocks, in dataset order and store order.
    conditions
        Condition vectors, ``(n, width)`` float32 with one row per row of :func:`training_index`, or
        ``None`` for a plain CVAE.
    memory_budget_bytes
        Raw patches up to this many bytes are read into RAM (default :data:`DEFAULT_MEMORY_BUDGET`,
        1 GiB); above it they are streamed through a chunk cache bounded by it.

    Returns
    -------
    PatchData
        The patches (in RAM or streamed), their anchors, conditions and compact index.

    Raises
    ------
    ValueError
        ``conditions`` with the wrong row count, or a dataset made with ``scale=False`` whose values leave
        [0, 1].
    """
    import zarr

    blocks = _training_blocks(datasets)
    index = _concat_index([frame for _, _, frame in blocks])
    ref = datasets[0].settings
    h, w = ref["patch_size"]
    c = len(ref["channels"])
    dtype = np.dtype(ref["store_dtype"])
    total = len(index) * h * w * c * dtype.itemsize
    norm = ref["normalization"]
    scale = bool(norm["scale"])
    if conditions is not None and len(conditions) != len(index):
        raise ValueError(f"conditions has {len(conditions)} rows; the datasets have {len(index)} patches.")
    groups: dict[tuple, int] = {}
    lows, highs, block_group, chunk_rows = [], [], [], []
    block_start = np.concatenate([[0], np.cumsum([len(frame) for _, _, frame in blocks])]).astype(np.int64)
    in_memory = total <= memory_budget_bytes
    raw = aligned_empty((len(index), h, w, c), dtype) if in_memory else None
    for b, (ds, sample, _) in enumerate(blocks):
        if scale:
            key = (ds.name, sample) if norm["scale_per_sample"] else (ds.name,)
            if key not in groups:
                low, high = ds.anchors(sample)
                groups[key] = len(lows)
                lows.append(low)
                highs.append(high)
            block_group.append(groups[key])
        else:
            block_group.append(0)
        chunk_rows.append(int(zarr.open_array(ds.path / P.STORE_DIR / sample, mode="r").chunks[0]))
        if raw is not None:
            sl = slice(block_start[b], block_start[b + 1])
            raw[sl] = ds.read(sample, normalized=False)
            if not scale:
                _check_unit_range(raw[sl], ds.name, sample)
    if not lows:
        lows, highs = [np.zeros(c, np.float32)], [np.ones(c, np.float32)]
    low = np.asarray(lows, np.float32)
    inv = (1.0 / (np.asarray(highs, np.float32) - low)).astype(np.float32)
    data = PatchData(index=_compact_index(index), low=low, inv=inv, scale=scale, conditions=conditions,
                     patch_shape=(h, w, c), dtype=dtype, stores=[(ds.path, sample) for ds, sample, _ in blocks],
                     block_start=block_start, block_group=block_group, chunk_rows=np.asarray(chunk_rows, np.int64),
                     raw=raw, cache_bytes=memory_budget_bytes)
    if not in_memory:
        chunk_bytes = int(max(chunk_rows)) * data.patch_bytes
        window = data.window_chunks * chunk_bytes
        data._cache.max_bytes = min(int(memory_budget_bytes), 2 * window + 2 * chunk_bytes)  # current and next
        logger.info("raw patches (%.2f GiB) exceed memory_budget_bytes (%.2f GiB): streaming from the store "
                    "through a chunk cache of at most %.0f MiB", total / 2**30, memory_budget_bytes / 2**30,
                    data._cache.max_bytes / 2**20)
        if memory_budget_bytes < 2 * window:
            logger.warning("memory_budget_bytes=%d holds less than two shuffle windows (2 x %.0f MiB): chunks are "
                           "decoded more than once per epoch; raise the budget for full speed.",
                           memory_budget_bytes, window / 2**20)
        if not scale:
            base = data._layout()[1]
            for b, (ds, sample, _) in enumerate(blocks):
                for key in range(int(base[b]), int(base[b + 1])):
                    _check_unit_range(data._load_chunk(key), ds.name, sample)
    return data


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialized C-contiguous array whose data start at a multiple of ``align`` bytes.

    TensorFlow can use such a buffer without a copy (:meth:`PatchData.raw_tensor`).

    Parameters
    ----------
    shape
        Shape of the array, e.g. ``(n, H, W, C)`` for patches.
    dtype
        Element type.
    align
        Alignment of the first element in bytes (64: what TensorFlow's CPU allocator uses).

    Returns
    -------
    numpy.ndarray
        A writable, uninitialized view of ``shape`` and ``dtype`` into a slightly larger byte buffer.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def _check_unit_range(raw: np.ndarray, dataset: str, sample: str) -> None:
    lo, hi = float(raw.min()), float(raw.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"dataset {dataset!r} was made with scale=False and sample {sample!r} has values in [{lo}, {hi}]; "
            "the model's Bernoulli likelihood needs patches in [0, 1]. Regenerate it with scale=True."
        )


def _training_blocks(datasets: Sequence[P.PatchDataset]) -> list[tuple[P.PatchDataset, str, pd.DataFrame]]:
    """(dataset, sample, index rows in store order) of every non-empty sample, in training-row order."""
    blocks = []
    for ds in datasets:
        keys, rows = group_rows(ds.index["sample"].to_numpy())  # one pass, not one scan per sample
        rows_of = dict(zip(keys.tolist(), rows, strict=True))
        for sample in ds.samples:
            if sample not in rows_of:
                continue
            sub = ds.index.iloc[rows_of[sample]].sort_values("row", kind="stable")
            if not np.array_equal(sub["row"].to_numpy(), np.arange(len(sub))):
                raise ValueError(f"dataset {ds.name!r}, sample {sample!r}: the index rows do not cover the store "
                                 "(0..n-1); regenerate the dataset.")
            blocks.append((ds, sample, sub))
    return blocks


def _concat_index(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    index = pd.concat(frames, ignore_index=True)
    index["sample"] = index["sample"].astype(str)
    return index


def training_index(datasets: Sequence[P.PatchDataset]) -> pd.DataFrame:
    """Concatenate the patch indexes in training-row order (samples in dataset order, store order within).

    Parameters
    ----------
    datasets
        The training patch datasets.

    Returns
    -------
    pandas.DataFrame
        One row per patch (``sample`` as str), with a fresh ``RangeIndex``: row ``i`` is training row ``i``.
    """
    return _concat_index([frame for _, _, frame in _training_blocks(datasets)])


def _compact_index(index: pd.DataFrame) -> pd.DataFrame:
    """The index as :class:`PatchData` keeps it (about 30 bytes per object plus the object name).

    Without the store ``row`` and ``padded`` (the blocks give the row), repeated strings as categories,
    object names as Arrow strings, integers as int32 where they fit.
    """
    out = index.drop(columns=[col for col in ("row", "padded") if col in index.columns])
    for col in out.columns:
        values = out[col]
        if values.dtype == object and pd.api.types.infer_dtype(values, skipna=False) == "string":
            many = values.nunique() > len(values) // 4
            out[col] = values.astype("string[pyarrow]" if many else "category")
        elif pd.api.types.is_integer_dtype(values.dtype) and values.dtype.itemsize > 4 and len(values) and \
                np.iinfo(np.int32).min <= values.min() and values.max() <= np.iinfo(np.int32).max:
            out[col] = values.astype(np.int32)
    return out


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

    Parameters
    ----------
    index
        The patch index in training-row order (:func:`training_index`); needs ``dataset`` and ``sample``.
    validation_fraction
        Share of the objects (or samples) held out for validation, strictly between 0 and 1 (default 0.2).
    seed
        Seed of the draw; the same seed gives the same split.
    split_by
        ``"object"`` (default): hold out objects within every (dataset, sample); ``"sample"``: hold out
        whole samples.

    Returns
    -------
    tuple of numpy.ndarray
        ``(train_positions, val_positions)``: sorted row positions into ``index``, disjoint, both
        non-empty, together all rows.

    Raises
    ------
    ValueError
        A fraction outside (0, 1), fewer than two patches, ``split_by="sample"`` with one sample, or an
        unknown ``split_by``.
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
    """Apply dihedral transform ``states[i]`` (0..7: ``k = s % 4`` quarter turns, mirrored if ``s >= 4``).

    Parameters
    ----------
    x
        Images ``(b, H, W, C)``; quarter turns of a non-square image need ``H == W`` (use even states).
    states
        Dihedral state of every image, ints in 0..7, ``(b,)``.

    Returns
    -------
    numpy.ndarray
        The transformed images (a new array; ``x`` is not changed).
    """
    out = x.copy()
    for s in np.unique(states):
        m = states == s
        sub = x[m]
        if s >= 4:
            sub = sub[:, :, ::-1]
        out[m] = np.rot90(sub, int(s) % 4, axes=(1, 2))
    return out


@dataclass
class BatchPlan:
    """One epoch's order of a split: ``order`` (rows in batch order) and its store chunks, window by window.

    Parameters
    ----------
    order
        Row positions of the split in batch order (batch ``i`` is ``order[i * batch_size:(i + 1) * batch_size]``).
    windows
        Global store chunks of every shuffle window, in the order the epoch first uses them.
    window_of_chunk
        Window of every global store chunk, int32 (-1: the chunk holds no row of this split).
    next_prefetch
        First window not yet handed to the chunk cache's prefetch (updated while the epoch streams).
    """

    order: np.ndarray
    windows: list[np.ndarray]  # store chunks of each window, in the order the epoch first uses them
    window_of_chunk: np.ndarray  # window of every store chunk (-1: not in this split)
    next_prefetch: int = 0  # first window not yet handed to the chunk cache's prefetch


def batch_plan(data: PatchData, positions: np.ndarray, *, shuffle: bool, seed: int, epoch: int) -> BatchPlan:
    """The order of ``positions`` in epoch ``epoch``: a chunk-wise shuffle, or ``positions`` as given.

    Shuffled, the store chunks touched are put in a seeded random order and cut into windows of
    ``data.window_chunks`` chunks (about ``SHUFFLE_WINDOW_BYTES`` of raw patches); the rows of each window
    are then shuffled together. A split smaller than one window is thus uniformly permuted, and a batch
    never needs more than two windows' chunks, so streaming decodes each chunk about once per epoch. The
    order depends on (seed, epoch), the positions and the store chunks only: not on the memory budget,
    nor on whether the patches are in RAM.

    Parameters
    ----------
    data
        The patches (their store chunks define the windows).
    positions
        Row positions of the split.
    shuffle
        Shuffle chunk-wise (training); ``False`` keeps ``positions`` in their order (validation).
    seed
        Seed of the shuffle.
    epoch
        Epoch number (0-based); every epoch has its own order.

    Returns
    -------
    BatchPlan
        The epoch's row order and its windows of store chunks.
    """
    chunk, _ = data.chunk_of(positions)
    if shuffle:
        rng = np.random.default_rng([int(seed), int(epoch), 1])
        keys, inverse = np.unique(chunk, return_inverse=True)
        perm = rng.permutation(len(keys))
        rank = np.empty(len(keys), np.int64)
        rank[perm] = np.arange(len(keys))
        order = positions[np.lexsort((rng.random(len(positions)), rank[inverse] // data.window_chunks))]
        sequence = keys[perm]
    else:
        order, sequence = positions, pd.unique(chunk)
    w = data.window_chunks
    windows = [sequence[i:i + w] for i in range(0, len(sequence), w)]
    window_of_chunk = np.full(int(data._layout()[1][-1]), -1, np.int32)
    for k, keys_k in enumerate(windows):
        window_of_chunk[keys_k] = k
    return BatchPlan(order=order, windows=windows, window_of_chunk=window_of_chunk)


class _PlannedBatches:
    """Batches of ``positions`` of a :class:`PatchData` following :func:`batch_plan`, with seeded flips.

    Batch ``i`` of epoch ``e`` holds rows ``plan(e).order[i * batch_size:(i + 1) * batch_size]``; with
    ``flip`` its patches get the dihedral states ``default_rng([seed, e, i, 2]).integers(0, 8)`` (even
    states only for non-square patches).
    """

    def _setup(self, data: PatchData, positions: np.ndarray, batch_size: int, shuffle: bool, flip: bool,
               seed: int) -> None:
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
        self._plans: OrderedDict[int, BatchPlan] = OrderedDict()
        self._plan_lock = threading.Lock()

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.batch_size)

    def plan(self, epoch: int) -> BatchPlan:
        """The order of epoch ``epoch`` (the last two epochs' plans are kept).

        Parameters
        ----------
        epoch
            Epoch number (0-based); ignored without ``shuffle`` (every epoch has the same order).

        Returns
        -------
        BatchPlan
            The epoch's :func:`batch_plan` (streaming: its first window starts decoding when it is made).
        """
        key = int(epoch) if self.shuffle else 0
        with self._plan_lock:
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = batch_plan(self.data, self.positions, shuffle=self.shuffle, seed=self.seed,
                                                     epoch=key)
                self.data.start(plan)
                while len(self._plans) > 2:
                    self._plans.popitem(last=False)
            return plan

    def _states(self, epoch: int, i: int, n: int) -> np.ndarray:
        """Dihedral states of the ``n`` patches of batch ``i`` of epoch ``epoch`` (zeros without ``flip``)."""
        if not self.flip:
            return np.zeros(n, np.int32)
        states = np.random.default_rng([self.seed, int(epoch), int(i), 2]).integers(0, 8, size=n)
        if self.n_states == 4:
            states = states - states % 2  # 0, 2, 4, 6: the symmetries of a rectangle
        return states.astype(np.int32)

    def batch_arrays(self, epoch: int, i: int) -> tuple[np.ndarray, ...]:
        """Raw patches, anchor groups, dihedral states (zeros without ``flip``) and positions of batch ``i``.

        Parameters
        ----------
        epoch
            Epoch number (0-based): selects the order and the dihedral draws.
        i
            Batch number within the epoch, ``0 <= i < len(self)``.

        Returns
        -------
        tuple of numpy.ndarray
            ``(raw, group, states, pos)``: raw patches ``(b, H, W, C)`` in the store's dtype, int32 anchor
            groups ``(b,)``, int32 dihedral states ``(b,)`` and the int64 row positions ``(b,)``.

        Raises
        ------
        IndexError
            ``i`` out of range.
        """
        if i < 0 or i >= len(self):
            raise IndexError(f"batch {i} out of range (0..{len(self) - 1}).")
        plan = self.plan(epoch)
        pos = plan.order[i * self.batch_size:(i + 1) * self.batch_size]
        states = self._states(epoch, i, len(pos))
        return self.data.raw_rows(pos, plan), self.data.group_of(pos).astype(np.int32), states, pos

    def epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, anchor groups and dihedral states of a whole epoch, in batch order.

        Batch ``i`` is the slice ``[i * batch_size:(i + 1) * batch_size]`` of each, with the values
        :meth:`batch_arrays` gives for it.

        Parameters
        ----------
        epoch
            Epoch number (0-based).

        Returns
        -------
        tuple of numpy.ndarray
            ``(pos, group, states)``: int64 row positions, int32 anchor groups and int32 dihedral states,
            each ``(len(positions),)``.
        """
        pos = self.plan(epoch).order
        states = np.concatenate([self._states(epoch, i, len(pos[i * self.batch_size:(i + 1) * self.batch_size]))
                                 for i in range(len(self))])
        return pos, self.data.group_of(pos).astype(np.int32), states


class PatchSequence(_PlannedBatches, keras.utils.PyDataset):
    """Batches ``{"image": ..., ["condition": ...]}`` of ``positions`` of a :class:`PatchData` (numpy, any backend).

    Parameters
    ----------
    data
        The patches.
    positions
        Rows of ``data`` in this split.
    batch_size
        Patches per batch (the last batch may be smaller; no patch is dropped).
    shuffle
        Seeded per-epoch chunk-wise shuffle (:func:`batch_plan`; training split only). Default ``False``:
        the rows in the order of ``positions``.
    flip
        Give every patch one of the 8 dihedral transforms (4 for non-square patches), drawn per batch
        from (seed, epoch, batch); training split only. Default ``False``.
    seed
        Seed of the order and the augmentation; batch ``i`` of epoch ``e`` depends only on (seed, e, i).
    workers
        Preparation threads (Keras PyDataset ``workers``, default 1).

    """

    def __init__(self, data: PatchData, positions: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 flip: bool = False, seed: int = 0, workers: int = 1) -> None:
        keras.utils.PyDataset.__init__(self, workers=max(int(workers), 1), use_multiprocessing=False,
                                       max_queue_size=max(4, 2 * int(workers)))
        self._setup(data, positions, batch_size, shuffle, flip, seed)
        self.epoch = 0

    @property
    def order(self) -> np.ndarray:
        """Rows of the current epoch in batch order."""
        return self.plan(self.epoch).order

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        raw, group, states, pos = self.batch_arrays(self.epoch, i)
        x = self.data.normalize(raw, group)
        if self.flip:
            x = dihedral(x, states)
        out = {"image": x}
        if self.data.conditions is not None:
            out["condition"] = self.data.conditions[pos]
        return out

    def on_epoch_end(self) -> None:
        """Advance to the next epoch's order and augmentation draws."""
        # Called by Keras after the epoch's batches were consumed (the enqueuer is stopped first).
        self.epoch += 1

    def keras_input(self) -> Any:
        """Return what ``fit`` consumes (the PyDataset itself).

        Returns
        -------
        PatchSequence
            ``self``: a ``keras.utils.PyDataset`` yielding ``{"image", ["condition"]}`` dicts.
        """
        return self


class TFPatchBatches(_PlannedBatches):
    """The batches of :class:`PatchSequence` as a ``tf.data`` pipeline (TensorFlow backend).

    With the patches in RAM (``in_graph``), one numpy call per *epoch* computes the epoch's rows, anchor
    groups and dihedral states; each batch is then gathered by index from the patch array (held as a
    tensor that shares the array's memory, :meth:`PatchData.raw_tensor`), normalized and transformed by
    TensorFlow ops in parallel map calls, prefetched: no Python runs per batch. Streamed from the store,
    one short numpy call per batch gathers the raw patches from the chunk cache (while the next window's
    chunks are decoded in the background) and the same ops follow. (A Python ``PyDataset`` behind
    ``tf.data`` holds the GIL for every batch and halves the throughput of small models on two cores.)
    Every pass over :meth:`keras_input` is the next epoch (0, 1, ...), with the order and draws of that
    epoch of :class:`PatchSequence`: both ways give the same batches.

    Parameters
    ----------
    data
        The patches.
    positions
        Rows of ``data`` in this split.
    batch_size
        Patches per batch (the last batch may be smaller; no patch is dropped).
    shuffle
        Seeded per-epoch chunk-wise shuffle (:func:`batch_plan`; training split only). Default ``False``.
    flip
        Seeded dihedral augmentation (training split only). Default ``False``.
    seed
        Seed of the order and the augmentation; batch ``i`` of epoch ``e`` depends only on (seed, e, i).
    workers
        Parallel map calls of the pipeline beyond the default two (default 1).
    in_graph
        Gather the batches inside the TensorFlow graph from the in-memory patches; ``None`` (default):
        whenever the patches are in RAM. ``False`` gathers each batch in a numpy call (the way streamed
        patches are read).
    """

    def __init__(self, data: PatchData, positions: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 flip: bool = False, seed: int = 0, workers: int = 1, in_graph: bool | None = None) -> None:
        self._setup(data, positions, batch_size, shuffle, flip, seed)
        self.workers = max(int(workers), 1)
        if in_graph and not data.in_memory:
            raise ValueError("in_graph=True needs the patches in RAM; these are streamed from the store "
                             "(raise memory_budget_bytes, or leave in_graph=None).")
        self.in_graph = data.in_memory if in_graph is None else bool(in_graph)
        self.epoch = 0  # the epoch the next pass will be
        self._dataset = None

    def keras_input(self) -> Any:
        """Return the ``tf.data.Dataset`` that ``fit`` consumes (built once).

        Returns
        -------
        tf.data.Dataset
            Batches ``{"image": float32 (b, H, W, C) in [0, 1], ["condition": float32 (b, width)]}``,
            ``len(self)`` per pass; every pass is the next epoch.
        """
        if self._dataset is None:
            self._dataset = self._build()
        return self._dataset

    def _next_epoch(self) -> np.int64:
        with self._plan_lock:
            epoch, self.epoch = self.epoch, self.epoch + 1
        return np.int64(epoch)

    def _epoch_arrays(self) -> list[np.ndarray]:
        return list(self.epoch_arrays(int(self._next_epoch())))

    def _arrays(self, epoch: np.int64, i: np.int64) -> list[np.ndarray]:
        raw, group, states, pos = self.batch_arrays(int(epoch), int(i))
        out = [raw, group, states]
        if self.data.conditions is not None:
            out.append(np.asarray(self.data.conditions[pos], np.float32))
        return out

    def _build(self) -> Any:
        import tensorflow as tf

        data = self.data
        low, inv = tf.constant(data.low), tf.constant(data.inv)
        n_cond = data.conditions.shape[1] if data.conditions is not None else None
        types = [tf.as_dtype(data.dtype), tf.int32, tf.int32] + ([tf.float32] if n_cond is not None else [])
        scale, flip, n = data.scale, self.flip, len(self)

        def epoch_batches(_):  # runs once per pass: the pass's epoch number, then (batch, epoch) pairs
            epoch = tf.numpy_function(self._next_epoch, [], tf.int64, stateful=True)
            return tf.data.Dataset.from_tensors(epoch).repeat(n).enumerate()

        def transform(raw, group, states, cond):
            raw = tf.ensure_shape(raw, (None, *data.patch_shape))
            if flip:  # on the raw patches: a permutation of pixels commutes with the per-channel scaling
                raw = _tf_dihedral(raw, tf.ensure_shape(states, (None,)))
            x = tf.cast(raw, tf.float32)
            if scale:
                group = tf.ensure_shape(group, (None,))
                x = (x - tf.gather(low, group)[:, None, None, :]) * tf.gather(inv, group)[:, None, None, :]
                x = tf.clip_by_value(x, 0.0, 1.0)
            out = {"image": x}
            if cond:
                out["condition"] = tf.ensure_shape(cond[0], (None, n_cond))
            return out

        def make(i, epoch):
            raw, group, states, *cond = tf.numpy_function(self._arrays, [epoch, i], types, stateful=False)
            return transform(raw, group, states, cond)

        if self.in_graph:  # one numpy call per epoch; batches gathered from the patch tensor
            raw_t = data.raw_tensor()
            cond_t = None if n_cond is None else tf.constant(np.asarray(data.conditions, np.float32))

            def epoch_rows(_):
                pos, group, states = tf.numpy_function(self._epoch_arrays, [], [tf.int64, tf.int32, tf.int32],
                                                       stateful=True)
                rows = tuple(tf.ensure_shape(v, (len(self.positions),)) for v in (pos, group, states))
                return tf.data.Dataset.from_tensor_slices(rows).batch(self.batch_size)

            def gather(pos, group, states):
                cond = [] if cond_t is None else [tf.gather(cond_t, pos)]
                return transform(tf.gather(raw_t, pos), group, states, cond)

            ds = tf.data.Dataset.from_tensors(np.int64(0)).flat_map(epoch_rows)
            ds = ds.apply(tf.data.experimental.assert_cardinality(n))
            ds = ds.map(gather, num_parallel_calls=max(self.workers, 2), deterministic=True)
        else:
            ds = tf.data.Dataset.from_tensors(np.int64(0)).flat_map(epoch_batches)
            ds = ds.apply(tf.data.experimental.assert_cardinality(n))
            ds = ds.map(make, num_parallel_calls=max(self.workers, 2), deterministic=True)
        options = tf.data.Options()
        options.deterministic = True
        # The parallelism and the buffer are fixed (two map calls, two batches ahead): tf.data's autotuner has
        # nothing to choose, and with it on, an epoch's first batches waited 0.3-5 s at random (idle CPU).
        options.autotune.enabled = False
        if self.in_graph:
            # tf.data's default graph rewrites serialize the pipeline, and with it the captured patch tensor:
            # a second copy of every patch. The pipeline is already fused by hand (one map, one prefetch).
            options.experimental_optimization.apply_default_optimizations = False
        return ds.with_options(options).prefetch(2)


def _dihedral_index(h: int, w: int) -> np.ndarray:
    """Pixel permutations of the 8 dihedral states (as :func:`dihedral`): row ``s`` maps output to input pixels.

    ``image.reshape(h * w, C)[table[s]]`` is ``dihedral(image[None], [s])[0]`` flattened. A non-square
    image has only the even states (0, 2, 4, 6); an odd state's row is that of the state below it.
    """
    grid = np.arange(h * w, dtype=np.int32).reshape(1, h, w, 1)
    rows = [dihedral(grid, np.array([s - (s % 2 if h != w else 0)]))[0].reshape(h * w) for s in range(8)]
    return np.stack(rows)


def _tf_dihedral(x: Any, states: Any) -> Any:
    """Apply the dihedral transform ``states[i]`` (as :func:`dihedral`) to each image, in TensorFlow.

    One gather per batch through a table of the 8 pixel permutations (:func:`_dihedral_index`), on any dtype
    (the raw patches, before they are scaled: a quarter of the bytes of float32).
    """
    import tensorflow as tf

    _, h, w, c = x.shape
    table = tf.constant(_dihedral_index(int(h), int(w)))
    flat = tf.reshape(x, (-1, int(h) * int(w), int(c)))
    return tf.reshape(tf.gather(flat, tf.gather(table, states), batch_dims=1), tf.shape(x))


def make_batches(data: PatchData, positions: np.ndarray, *, batch_size: int, shuffle: bool = False,
                 flip: bool = False, seed: int = 0, workers: int = 1,
                 in_graph: bool | None = None) -> PatchSequence | TFPatchBatches:
    """:class:`TFPatchBatches` with the TensorFlow backend, else :class:`PatchSequence` (the same batches).

    Parameters
    ----------
    data
        The patches (:func:`load_patch_data`).
    positions
        Rows of ``data`` in this split (:func:`split_train_val`).
    batch_size
        Patches per batch (the last batch may be smaller).
    shuffle
        Seeded per-epoch chunk-wise shuffle (training split). Default ``False``.
    flip
        Seeded dihedral augmentation (training split). Default ``False``.
    seed
        Seed of the order and the augmentation.
    workers
        Preparation threads or parallel map calls (default 1).
    in_graph
        TensorFlow backend: gather batches inside the ``tf.data`` graph (see :class:`TFPatchBatches`;
        ``None``, the default: whenever the patches are in RAM). Ignored with another backend.

    Returns
    -------
    PatchSequence or TFPatchBatches
        The batches; pass ``.keras_input()`` to ``fit``.
    """
    kw = dict(batch_size=batch_size, shuffle=shuffle, flip=flip, seed=seed, workers=workers)
    if keras.backend.backend() == "tensorflow":
        return TFPatchBatches(data, positions, in_graph=in_graph, **kw)
    return PatchSequence(data, positions, **kw)


# --------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------


def float32_model(model: keras.Model) -> keras.Model:
    """``model`` itself when it computes in float32, else a float32 copy of it with the same weights.

    A model trained under a mixed-precision policy keeps float32 weights; the copy is the same model (same
    configuration, same weights and random states) built under ``float32``, so what is saved and encoded
    is the float32 model a float32 training makes (:func:`save_model_atomic`, :func:`train`).

    Parameters
    ----------
    model
        A :class:`~phenocoder_lib.models.CVAE` (or another Keras model with ``get_config``/``from_config``).

    Returns
    -------
    keras.Model
        A float32 model (not compiled when it is a copy).
    """
    if keras.backend.standardize_dtype(model.dtype_policy.compute_dtype) == "float32":
        return model
    with dtype_policy("float32"):
        copy = type(model).from_config({**model.get_config(), "dtype": "float32"})
    copy.set_weights(model.get_weights())
    return copy


def save_model_atomic(model: keras.Model, path: str | Path) -> Path:
    """``model.save(path)`` through a temporary sibling file, so ``path`` is always a complete model.

    A model trained under a mixed-precision policy is saved as its float32 copy (:func:`float32_model`):
    the file loads, and encodes, exactly like one trained in float32.

    Parameters
    ----------
    model
        The model to save.
    path
        The ``.keras`` file to write (replaced atomically).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from .io import atomic_file

    with atomic_file(path) as tmp:
        float32_model(model).save(tmp)
    return Path(path)


class BestCheckpoint(keras.callbacks.Callback):
    """Write the model to ``path`` (atomically) whenever ``monitor`` improves.

    Beside it, ``<stem>.json`` records the checkpoint's epoch (1-based), the monitored value, the learning
    rate and the SHA-1 of the ``.keras`` file, so :func:`checkpoint_state` can tell which epoch a
    checkpoint holds after a crash (resuming continues from there).

    Parameters
    ----------
    path
        The ``.keras`` file of the checkpoint.
    monitor
        The logged metric to minimize (default ``"val_loss"``).
    best
        The value to beat (default infinity; a resumed run passes its checkpoint's value).
    """

    def __init__(self, path: str | Path, monitor: str = "val_loss", best: float = np.inf) -> None:
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.best = float(best)
        self.best_epoch: int | None = None
        self._float32: keras.Model | None = None  # the float32 copy of a mixed-precision model, made once

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Save the model when ``monitor`` improved in this epoch.

        Parameters
        ----------
        epoch
            The epoch (0-based, as Keras counts).
        logs
            The epoch's metrics.
        """
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and value < self.best:
            self.best, self.best_epoch = float(value), epoch
            if self._float32 is None:
                self._float32 = float32_model(self.model)
            elif self._float32 is not self.model:
                self._float32.set_weights(self.model.get_weights())
            save_model_atomic(self._float32, self.path)
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
    (written before the checkpoint in every epoch).

    Parameters
    ----------
    model_dir
        The model folder.
    checkpoint
        File name of the checkpoint in it (default ``"checkpoint.keras"``).

    Returns
    -------
    dict
        ``path`` (the checkpoint), ``epoch`` (1-based), ``val_loss``, ``learning_rate`` (of that epoch) and
        ``history`` (every metric up to that epoch).

    Raises
    ------
    FileNotFoundError
        No checkpoint.
    ValueError
        Neither a matching record nor a ``history.json`` tells which epoch the checkpoint holds.
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

    Parameters
    ----------
    folder
        Where ``history.json`` and ``history.csv`` are written after each epoch (``None``: not written).
    n_train
        Training patches per epoch (for ``train_patches_per_s``).
    history
        Metrics of earlier epochs to continue (a resumed run), or ``None``.
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
        """Start the epoch's clock and note its learning rate.

        Parameters
        ----------
        epoch
            The epoch (0-based).
        logs
            Unused.
        """
        self._t0 = time.perf_counter()
        self._train_end: float | None = None
        lr = self.model.optimizer.learning_rate
        self._lr = float(lr.numpy() if hasattr(lr, "numpy") else lr)

    def on_test_begin(self, logs: dict | None = None) -> None:
        """Note the end of the training pass (the validation pass begins).

        Parameters
        ----------
        logs
            Unused.
        """
        if self._train_end is None:  # the validation pass of this epoch starts: the training pass is over
            self._train_end = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        """Append the epoch's row and write the history files.

        Parameters
        ----------
        epoch
            The epoch (0-based; recorded 1-based as ``epoch``).
        logs
            The epoch's metrics from Keras.
        """
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
    """``history.json`` and ``history.csv`` (one row per epoch), atomically.

    Parameters
    ----------
    history
        Metric name -> one value per epoch (all lists of the same length).
    folder
        The folder to write into.
    """
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
    """Compile (Adam) and fit ``model`` with early stopping, checkpoints and a metrics history.

    Writes ``model_dir/checkpoint.keras`` (best so far), ``history.json``/``history.csv`` (every
    epoch) and TensorBoard event files under ``log_dir``. The best weights are restored at the end.

    Parameters
    ----------
    model
        The model (:func:`phenocoder_lib.models.make_model`).
    train
        Training batches (:func:`make_batches`, shuffled and flipped as configured).
    val
        Validation batches (:func:`make_batches`, neither shuffled nor flipped).
    model_dir
        Folder of the checkpoint and the history (created).
    log_dir
        TensorBoard folder (``None``: no event files).
    n_epochs
        Epochs in all (>= 1; default 100).
    learning_rate
        Adam's initial learning rate (> 0; default 1e-3).
    min_learning_rate
        Lower bound of ``ReduceLROnPlateau(val_loss)`` (>= 0; default 1e-4).
    factor_learning_rate
        Factor ``ReduceLROnPlateau`` multiplies the learning rate by, in (0, 1) (default 0.2).
    learning_rate_patience
        Epochs without a better ``val_loss`` before the learning rate is reduced (default 3).
    early_stopping_patience
        Epochs without a better ``val_loss`` before ``EarlyStopping(val_loss, restore_best_weights=True)``
        stops (default 5).
    seed
        Seed of Keras's random state (dropout, sampling noise) for the run.
    verbose
        Keras's progress output.
    on_epoch_end
        Called after every epoch (1-based) with that epoch's row of the history (losses, validation
        losses, learning rate, timings), e.g. to log metrics while training runs.
    resume_from
        A :func:`checkpoint_state` whose weights ``model`` already holds: epochs are numbered on from the
        checkpoint's epoch up to ``n_epochs`` in all, the history is kept, the learning rate is the one of
        the checkpoint's epoch and the checkpoint is only replaced by a better epoch (Adam's moments and
        the plateau/early-stopping counters start afresh).

    Returns
    -------
    dict
        ``history`` (metrics per epoch), ``best_epoch`` (1-based) and ``seconds``.
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
    compile_model(model, lr0)
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
    """``z_mean`` of the (unaugmented) patches at ``positions`` of ``data``.

    Parameters
    ----------
    model
        A :class:`~phenocoder_lib.models.CVAE` or ``CondCVAE``.
    data
        The patches (and conditions).
    positions
        Row positions to encode, in order.
    batch_size
        Patches per forward pass (default 256; ``z_mean`` does not depend on it).

    Returns
    -------
    numpy.ndarray
        float32 ``(len(positions), n_latent_dim)``.
    """
    out = []
    for start in range(0, len(positions), batch_size):
        pos = positions[start:start + batch_size]
        x = data.batch(pos)
        inputs = [x, data.conditions[pos]] if model.conditional else x
        out.append(np.asarray(model.encoder.predict_on_batch(inputs)[0], np.float32))
    return np.concatenate(out) if out else np.zeros((0, model.n_latent_dim), np.float32)


def reconstruct(model: keras.Model, data: PatchData, positions: np.ndarray, batch_size: int = 256) -> tuple:
    """Return (inputs, reconstructions from ``z_mean``) of the patches at ``positions`` (deterministic).

    Parameters
    ----------
    model
        A :class:`~phenocoder_lib.models.CVAE` or ``CondCVAE``.
    data
        The patches (and conditions).
    positions
        Row positions, in order.
    batch_size
        Patches per forward pass (default 256).

    Returns
    -------
    tuple of numpy.ndarray
        ``(inputs, reconstructions)``, both float32 ``(len(positions), H, W, C)`` in [0, 1].
    """
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


# --------------------------------------------------------------------------------------------------
# Train: settings and datasets in, a model folder out (the one entry of the facade and the pipeline)
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainedModel:
    """A model with its configuration, its folder and its training state.

    Made by :func:`prepare` (untrained), :func:`train` and :func:`load_model`.

    Parameters
    ----------
    model
        The Keras model (:class:`~phenocoder_lib.models.CVAE` or ``CondCVAE``).
    config
        Its ``model_config.json`` (:mod:`phenocoder_lib.model_config`).
    folder
        The model folder.
    log_dir
        The TensorBoard folder (``None``: no event files).
    conditions
        The :class:`~phenocoder_lib.conditions.ConditionEncoder` of a conditional model, else ``None``.
    history
        Metrics per epoch (``None`` before training).
    batches
        ``(train, validation)`` batches, kept between :func:`prepare` and :func:`train`; ``None`` after
        :func:`load_model` (rebuilt from the datasets when training continues).

    """

    model: Any
    config: dict[str, Any]
    folder: Path
    log_dir: Path | None = None
    conditions: Any = None
    history: dict[str, list[float]] | None = None
    batches: tuple[Any, Any] | None = None


def _training_batches(datasets: Sequence[P.PatchDataset], config: dict[str, Any],
                      obs: pd.DataFrame | None) -> tuple[Any, Any]:
    """Training/validation batches as ``config`` prescribes; records the split sizes in ``config``."""
    from .conditions import ConditionEncoder, condition_frame

    index = training_index(datasets)
    cond_array = None
    if config["conditions"]:
        enc = ConditionEncoder.from_dict(config["conditions_encoder"])
        frame = condition_frame(config["conditions"], index=index, sample_key=config["keys"]["sample_key"], obs=obs)
        cond_array, _ = enc.transform(frame, warn=False)
    train_pos, val_pos = split_train_val(index, validation_fraction=config["validation_fraction"],
                                         seed=config["seed"], split_by=config["split_by"])
    data = load_patch_data(datasets, conditions=cond_array,
                           memory_budget_bytes=config.get("memory_budget_bytes", DEFAULT_MEMORY_BUDGET))
    batches = (make_batches(data, train_pos, batch_size=config["batch_size"], shuffle=config["shuffle"],
                            flip=config["flip"], seed=config["seed"], workers=config["n_workers"]),
               make_batches(data, val_pos, batch_size=config["batch_size"], seed=config["seed"],
                            workers=config["n_workers"]))
    config["split"] = {"n_train": int(len(train_pos)), "n_val": int(len(val_pos)), "by": config["split_by"]}
    return batches


def prepare(
    datasets: Sequence[P.PatchDataset],
    out_dir: str | Path,
    settings: Any,
    *,
    keys: Mapping[str, str] | None = None,
    obs: pd.DataFrame | None = None,
    log_dir: str | Path | None = None,
    name_folders: bool = False,
) -> TrainedModel:
    """Build an untrained model and its batches from settings and patch datasets; write its config.

    Parameters
    ----------
    datasets
        The training patch datasets (the same settings and normalization, matching ``input_shape``).
    out_dir
        The model folder (created); ``model_config.json`` is written there.
    settings
        A :class:`~phenocoder_lib.model_config.ModelSettings` (or a mapping of its fields).
    keys
        ``table_key``, ``sample_key``, ``image_key``, ``spatial_key`` of the source data (defaults from
        :mod:`phenocoder_lib.keys` for those not given).
    obs
        The source table's ``.obs``, for conditions that are not columns of the patch index.
    log_dir
        TensorBoard folder (``None``: no event files).
    name_folders
        Put the model in ``out_dir/<model_name>`` and the logs in ``log_dir/<model_name>``.

    Returns
    -------
    TrainedModel
        The untrained model (``history`` is ``None``) with its batches.
    """
    from . import keys as K
    from . import models as M
    from .conditions import ConditionEncoder
    from .model_config import MODEL_CONFIG_FILE, ModelSettings, build_model_config

    if not isinstance(settings, ModelSettings):
        settings = ModelSettings(**dict(settings))
    datasets = list(datasets)
    ref = check_datasets(datasets, settings.input_shape)
    keys = {"table_key": K.DEFAULT_TABLE_KEY, "sample_key": K.DEFAULT_SAMPLE_KEY, "image_key": K.DEFAULT_IMAGE_KEY,
            "spatial_key": K.SPATIAL_KEY, **(keys or {})}
    config = build_model_config(settings, datasets, index=training_index(datasets), keys=keys, obs=obs)
    name = config["model_name"]
    folder = Path(out_dir) / name if name_folders else Path(out_dir)
    logs = None if log_dir is None else (Path(log_dir) / name if name_folders else Path(log_dir))
    keras.utils.set_random_seed(settings.seed)
    with dtype_policy(mixed_precision_policy()):  # saved and returned after training as float32 models
        model = M.make_model(input_shape=settings.input_shape, n_latent_dim=int(settings.n_latent_dim),
                             n_dense_dim=int(settings.n_dense_dim), conv_layers=settings.conv_layers,
                             dropout=settings.dropout, beta=float(settings.beta),
                             n_conditions=config["conditions_dim"], seed=settings.seed)
    batches = _training_batches(datasets, config, obs)
    write_json_atomic(folder / MODEL_CONFIG_FILE, config)
    logger.info("initialized %s %s: %d training / %d validation patches, input %s, patch normalization %s",
                config["model_class"], name, config["split"]["n_train"], config["split"]["n_val"],
                settings.input_shape, {k: ref["normalization"][k] for k in _NORM_KEYS})
    enc = ConditionEncoder.from_dict(config["conditions_encoder"]) if config["conditions_encoder"] else None
    return TrainedModel(model=model, config=config, folder=folder, log_dir=logs, conditions=enc, batches=batches)


def train(
    datasets: Sequence[P.PatchDataset],
    out_dir: str | Path,
    config: Any,
    *,
    keys: Mapping[str, str] | None = None,
    obs: pd.DataFrame | None = None,
    log_dir: str | Path | None = None,
    start: TrainedModel | None = None,
    n_epochs: int = 100,
    learning_rate: float = 1e-3,
    min_learning_rate: float = 1e-4,
    factor_learning_rate: float = 0.2,
    learning_rate_patience: int = 3,
    early_stopping_patience: int = 5,
    plot: bool = True,
    n_preview: int = 300,
    plot_frac: float = 0.001,
    verbose: int | str = "auto",
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool = False,
) -> TrainedModel:
    """Train a model on patch datasets and write its folder (model, config, history, checkpoint, previews).

    Builds the model with :func:`prepare` (unless ``start`` is given), fits it with :func:`fit`, saves
    ``model.keras`` (best weights), adds the training parameters and best epoch to ``model_config.json``
    and, with ``plot``, draws ``history.png``, ``reconstructions.png`` and ``latent_space.png``
    (:func:`phenocoder_lib.plotting.training_previews`).

    Parameters
    ----------
    datasets
        The training patch datasets.
    out_dir
        The model folder (ignored when ``start`` is given: its folder is used).
    config
        A :class:`~phenocoder_lib.model_config.ModelSettings` (or a mapping of its fields); ignored when
        ``start`` is given.
    keys
        Key names of the source data, as for :func:`prepare`.
    obs
        The source table's ``.obs`` (conditions that are not patch-index columns), as for :func:`prepare`.
    log_dir
        TensorBoard folder (``None``: no event files), as for :func:`prepare`.
    start
        A model to train further: from :func:`prepare`, or :func:`load_model` (its batches are rebuilt from
        ``datasets`` with the same split).
    n_epochs
        Epochs in all (with ``resume``, the interrupted ones included).
    learning_rate
        Adam's initial learning rate (default 1e-3).
    min_learning_rate
        Lower bound of ``ReduceLROnPlateau(val_loss)`` (default 1e-4).
    factor_learning_rate
        Factor of each learning-rate reduction, in (0, 1) (default 0.2).
    learning_rate_patience
        Epochs without a better ``val_loss`` before the learning rate is reduced (default 3).
    early_stopping_patience
        Epochs without a better ``val_loss`` before training stops, best weights restored (default 5).
    plot
        Draw the previews.
    n_preview
        Validation patches shown in ``reconstructions.png``.
    plot_frac
        Share of the training patches (at least one batch) whose latents ``latent_space.png`` shows.
    verbose
        Keras's progress output.
    on_epoch_end
        Called after every epoch (1-based) with that epoch's metrics.
    resume
        Continue an interrupted training from the best checkpoint of the model folder (weights, epoch,
        history, learning rate).

    Returns
    -------
    TrainedModel
        The trained model, its configuration, folder and ``history``.
    """
    from . import plotting
    from .model_config import CHECKPOINT_FILE, MODEL_CONFIG_FILE, MODEL_FILE

    if not 0 < float(plot_frac) <= 1:
        raise ValueError(f"plot_frac={plot_frac!r} must be in (0, 1].")
    if isinstance(n_preview, bool) or not isinstance(n_preview, (int, np.integer)) or n_preview < 1:
        raise ValueError(f"n_preview={n_preview!r} must be a positive int.")
    datasets = list(datasets)
    run = start if start is not None else prepare(datasets, out_dir, config, keys=keys, obs=obs, log_dir=log_dir)
    if run.batches is None:
        run.batches = _training_batches(datasets, run.config, obs)
    resume_from = None
    if resume:
        resume_from = checkpoint_state(run.folder, CHECKPOINT_FILE)
        saved = keras.saving.load_model(resume_from["path"], safe_mode=True, compile=False)
        run.model.set_weights(saved.get_weights())
        logger.info("resuming %s from epoch %d (val_loss %.4g)", run.config["model_name"], resume_from["epoch"],
                    resume_from["val_loss"])
    elif run.log_dir is not None and Path(run.log_dir).exists():
        import shutil

        shutil.rmtree(run.log_dir)
    result = fit(run.model, *run.batches, model_dir=run.folder, log_dir=run.log_dir, n_epochs=n_epochs,
                 learning_rate=learning_rate, min_learning_rate=min_learning_rate,
                 factor_learning_rate=factor_learning_rate, learning_rate_patience=learning_rate_patience,
                 early_stopping_patience=early_stopping_patience, seed=run.config["seed"], verbose=verbose,
                 on_epoch_end=on_epoch_end, resume_from=resume_from)
    policy = run.model.dtype_policy.name
    run.model = float32_model(run.model)  # encode and save in float32, as a loaded model does
    save_model_atomic(run.model, Path(run.folder) / MODEL_FILE)
    run.history = result["history"]
    run.config["training"] = {
        "n_epochs": int(n_epochs), "learning_rate": float(learning_rate),
        "min_learning_rate": float(min_learning_rate), "factor_learning_rate": float(factor_learning_rate),
        "learning_rate_patience": int(learning_rate_patience),
        "early_stopping_patience": int(early_stopping_patience),
        "epochs_run": len(run.history.get("loss", [])), "best_epoch": result["best_epoch"],
        "seconds": round(result["seconds"], 3), "dtype_policy": policy,
    }
    write_json_atomic(Path(run.folder) / MODEL_CONFIG_FILE, run.config)
    if plot:
        plotting.training_previews(run, obs=obs, n_preview=int(n_preview), plot_frac=float(plot_frac))
    return run


def load_model(path: str | Path) -> TrainedModel:
    """Load a trained model, its configuration (older schemas migrated) and its history from its folder.

    Parameters
    ----------
    path
        The model folder, its ``model_config.json`` or a ``.keras`` file inside it (e.g. the
        ``checkpoint.keras`` of an interrupted run).

    Returns
    -------
    TrainedModel
        Without batches and TensorBoard folder.

    Raises
    ------
    FileNotFoundError, ValueError, TypeError
        A missing file, a damaged or too new ``model_config.json``, a ``.keras`` file that is not a CVAE.
    """
    from . import models as M
    from .conditions import ConditionEncoder
    from .model_config import MODEL_CONFIG_FILE, model_folder_files, read_model_config

    folder, keras_path = model_folder_files(path)
    config = read_model_config(folder / MODEL_CONFIG_FILE)
    model = keras.saving.load_model(keras_path, safe_mode=True, compile=False)
    if not isinstance(model, M.CVAE):
        raise TypeError(f"{str(keras_path)!r} holds a {type(model).__name__}, not a Phenocoder CVAE.")
    history_path = folder / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else None
    enc = ConditionEncoder.from_dict(config["conditions_encoder"]) if config.get("conditions_encoder") else None
    logger.info("loaded %s from %s", config["model_class"], keras_path)
    return TrainedModel(model=model, config=config, folder=folder, conditions=enc, history=history)
