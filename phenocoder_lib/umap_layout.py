"""UMAP's layout of a fuzzy graph, with umap-learn's own kernels but without running ``umap/__init__`` (pynndescent).

``import umap`` runs ``umap/__init__``, which imports ``umap.umap_`` and with it pynndescent, whose ~60
distance functions numba compiles eagerly and without an on-disk cache: 6-8 s in every new process, for
an embedding of a few hundred wells that then takes milliseconds. The layout itself needs none of that:
its SGD kernel (``umap.layouts.optimize_layout_euclidean``) and spectral initialisation
(``umap.spectral.spectral_layout``) live in submodules that import only each other.
:func:`umap_kernels` imports those submodules with the package registered but its ``__init__`` deferred
(1-2 s), and :func:`umap_layout` does the rest of ``umap.umap_.simplicial_set_embedding`` the way
``scanpy.tl.umap`` calls it (Euclidean output, no densMAP), so the coordinates are the ones scanpy computes
from the same graph and seed (``tests/lib/test_umap_layout.py`` compares them bit for bit).
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
from numba import njit

__all__ = ["find_ab_params", "membership_strengths", "umap_kernels", "umap_layout"]

# umap-learn's bounds of the three int64 seeds of its layout RNG (``umap.umap_.INT32_MIN/MAX``).
_SEED_LOW = np.iinfo(np.int32).min + 1
_SEED_HIGH = np.iinfo(np.int32).max - 1

_LOCK = threading.Lock()
_INIT_LOCK = threading.RLock()
_KERNELS: SimpleNamespace | None = None


def umap_kernels() -> SimpleNamespace:
    """Return umap-learn's ``optimize_layout_euclidean`` and ``spectral_layout`` (loaded once per process).

    When ``umap`` is not imported yet, it is registered as a :class:`_DeferredPackage` (see there) and only
    ``umap.layouts`` and ``umap.spectral`` (with ``umap.distances``, ``umap.utils``, ``umap.sparse``) are
    imported; otherwise they come from the package as it is.

    Returns
    -------
    types.SimpleNamespace
        ``optimize_layout_euclidean`` and ``spectral_layout``.
    """
    import importlib

    global _KERNELS
    with _LOCK:
        if _KERNELS is None:
            _register_deferred_package()
            layouts, spectral = importlib.import_module("umap.layouts"), importlib.import_module("umap.spectral")
            _KERNELS = SimpleNamespace(optimize_layout_euclidean=layouts.optimize_layout_euclidean,
                                       spectral_layout=spectral.spectral_layout)
        return _KERNELS


class _DeferredPackage(ModuleType):
    """The ``umap`` package with its submodules importable and its ``__init__`` not run yet.

    It stays in ``sys.modules`` as ``umap``: ``import umap.layouts`` (numba does so by name when it compiles)
    finds it, and the first attribute that only ``__init__`` defines (``umap.UMAP``, ``umap.__version__``,
    anything ``from umap import ...`` asks for) runs ``__init__`` in place, once, exactly as ``import umap``
    would have (``umap.parametric_umap`` kept from importing TensorFlow, as :func:`phenocoder_lib._lazy.import_scanpy`
    does); the module then is a plain module.
    """

    def __getattr__(self, name: str) -> Any:
        with _INIT_LOCK:
            if type(self) is _DeferredPackage and not self.__dict__.get("_phenocoder_init_running"):
                self.__dict__["_phenocoder_init_running"] = True
                try:
                    from ._lazy import parametric_umap_blocked

                    with parametric_umap_blocked():
                        self.__spec__.loader.exec_module(self)
                    self.__class__ = ModuleType
                finally:
                    self.__dict__.pop("_phenocoder_init_running", None)
                return getattr(self, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


def _register_deferred_package() -> None:
    """Put a :class:`_DeferredPackage` for ``umap`` into ``sys.modules`` unless ``umap`` is there already.

    Done under the import system's own lock for ``umap``, so that a concurrent ``import umap`` either
    finishes first (then it is used as it is) or finds the deferred package.
    """
    import contextlib
    import importlib.util
    from importlib import _bootstrap  # type: ignore[attr-defined]

    if "umap" in sys.modules:
        return
    module_lock = getattr(_bootstrap, "_ModuleLockManager", None)  # CPython's per-module import lock
    with module_lock("umap") if module_lock else contextlib.nullcontext():
        if "umap" in sys.modules:
            return
        spec = importlib.util.find_spec("umap")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("umap-learn is not installed: pip install umap-learn")
        package = importlib.util.module_from_spec(spec)  # __path__, __spec__, __file__; __init__ not run
        package.__class__ = _DeferredPackage
        sys.modules["umap"] = package


def find_ab_params(spread: float = 1.0, min_dist: float = 0.1) -> tuple[float, float]:
    """Return UMAP's curve parameters ``a, b``: the least-squares fit of ``1 / (1 + a d^(2b))`` to the target.

    The target is 1 up to ``min_dist`` and ``exp(-(d - min_dist) / spread)`` beyond, on 300 points of
    ``[0, 3 spread]`` (umap-learn's ``find_ab_params``; scanpy stores the result in ``uns['umap']``).

    Parameters
    ----------
    spread
        Scale of the embedded points.
    min_dist
        Distance up to which the target is 1.

    Returns
    -------
    a, b : float
        The fitted curve parameters.
    """
    from scipy.optimize import curve_fit

    d = np.linspace(0.0, spread * 3.0, 300)
    target = np.where(d < min_dist, 1.0, np.exp(-(d - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a_, b_: 1.0 / (1.0 + a_ * x ** (2.0 * b_)), d, target)
    return float(a), float(b)


def umap_layout(graph, data: np.ndarray, *, n_components: int = 2, min_dist: float = 0.1, spread: float = 1.0,
                init: str | np.ndarray = "spectral", seed: int = 0, n_epochs: int | None = None,
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Lay out a fuzzy graph (UMAP connectivities) in ``n_components`` dimensions, as ``scanpy.tl.umap`` does.

    Parameters
    ----------
    graph
        Symmetric sparse connectivities, shape (n, n) (e.g. :func:`~phenocoder_lib.clustering.umap_connectivities`).
    data
        The rows the graph was built from (shape (n, p)); the spectral initialisation uses it to place
        disconnected components.
    n_components
        Dimensions of the layout.
    min_dist, spread
        UMAP's ``min_dist`` and ``spread`` (through :func:`find_ab_params`).
    init
        ``'spectral'``, ``'random'`` or an array of initial positions, shape (n, n_components).
    seed
        Seed of ``numpy.random.RandomState``, as scanpy's ``random_state``.
    n_epochs
        SGD epochs (default: 500 up to 10,000 rows, else 200).

    Returns
    -------
    coords : numpy.ndarray
        float32, shape (n, n_components).
    params : dict
        ``{'a': a, 'b': b}`` (plus ``'random_state'`` when the seed is not 0): scanpy's ``uns['umap']['params']``.
    """
    import scipy.sparse as sp

    kernels = umap_kernels()
    a, b = find_ab_params(spread, min_dist)
    rng = np.random.RandomState(seed)
    # scanpy's edge order (the SGD visits edges in it): CSR -> COO keeps the row order and flags
    g = (graph if sp.issparse(graph) else sp.csr_matrix(graph)).tocoo(copy=True)
    g.sum_duplicates()
    n = g.shape[0]
    default = 500 if n <= 10_000 else 200
    epochs = default if n_epochs is None else int(n_epochs)
    g.data[g.data < g.data.max() / float(epochs if epochs > 10 else default)] = 0.0  # too weak to be sampled
    g.eliminate_zeros()
    coords = _initial_positions(kernels, g, np.asarray(data), n_components, init, rng)
    # every edge is sampled in proportion to its weight: once per `epochs_per_sample` epochs
    epochs_per_sample = np.full(g.data.shape[0], -1.0)
    n_samples = epochs * (g.data / g.data.max())
    sampled = n_samples > 0  # (n_samples keeps the weights' float32; the division is float64, as umap's)
    epochs_per_sample[sampled] = float(epochs) / n_samples[sampled].astype(np.float64)
    rng_state = rng.randint(_SEED_LOW, _SEED_HIGH, 3).astype(np.int64)
    low, high = coords.min(axis=0), coords.max(axis=0)
    coords = (10.0 * (coords - low) / (high - low)).astype(np.float32, order="C")
    coords = kernels.optimize_layout_euclidean(coords, coords, g.row, g.col, epochs, g.shape[1], epochs_per_sample,
                                               a, b, rng_state, 1.0, 1.0, 5, parallel=False, verbose=False,
                                               densmap=False, densmap_kwds={}, tqdm_kwds=None, move_other=True)
    params: dict[str, Any] = {"a": a, "b": b}
    if seed != 0:
        params["random_state"] = seed
    return coords, params


def _initial_positions(kernels, g, data: np.ndarray, n_components: int, init, rng) -> np.ndarray:
    """Initial layout: scaled spectral embedding (plus 1e-4 noise), uniform random, or the given positions."""
    if isinstance(init, str) and init == "random":
        return rng.uniform(low=-10.0, high=10.0, size=(g.shape[0], n_components)).astype(np.float32)
    if isinstance(init, str) and init == "spectral":
        coords = kernels.spectral_layout(data, g, n_components, rng, metric="euclidean", metric_kwds={})
        coords = (coords * (10.0 / np.abs(coords).max())).astype(np.float32)
        return coords + rng.normal(scale=0.0001, size=coords.shape).astype(np.float32)
    if isinstance(init, str):
        raise ValueError(f"init={init!r}: pass 'spectral', 'random' or an array of shape (n, {n_components}).")
    coords = np.asarray(init, dtype=np.float32)
    if coords.shape != (g.shape[0], n_components):
        raise ValueError(f"init has shape {coords.shape}; expected ({g.shape[0]}, {n_components}).")
    if np.unique(coords, axis=0).shape[0] < coords.shape[0]:  # coincident starts: jitter by 0.1 % of the spacing
        from sklearn.neighbors import KDTree

        dist, _ = KDTree(coords).query(coords, k=2)
        coords = coords + rng.normal(scale=0.001 * np.mean(dist[:, 1]), size=coords.shape).astype(np.float32)
    return coords


@njit(cache=True)
def membership_strengths(excess: np.ndarray, sigma: np.ndarray) -> np.ndarray:  # pragma: no cover - numba
    """``exp(-excess / sigma)`` per row in float32 with the C library's ``expf``, as umap's numba kernel computes it.

    numpy's vectorized float32 ``exp`` differs from ``expf`` in the last bit for about a third of the
    values; this keeps a graph (:func:`~phenocoder_lib.clustering.umap_connectivities` with
    ``libm_exp=True``) bit-identical to scanpy's, and so the UMAP layout on it.

    Parameters
    ----------
    excess
        float32, shape (n, k): each neighbour's distance minus the row's nearest distance ``rho``.
    sigma
        float32, shape (n,): the rows' bandwidths.

    Returns
    -------
    numpy.ndarray
        float32, shape (n, k).
    """
    out = np.empty_like(excess)
    for i in range(excess.shape[0]):
        for j in range(excess.shape[1]):
            out[i, j] = np.exp(-(excess[i, j] / sigma[i]))
    return out
