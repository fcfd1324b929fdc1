"""Consistent clusters across samples: pooled Leiden once, label transfer for every later sample.

:func:`cluster_features` clusters objects of all samples together (optional standardisation ->
PCA -> kNN graph -> Leiden, igraph flavour, seeded) and returns a :class:`ClusterReference` that
holds everything needed to label new objects the same way: the standardisation, the PCA loadings,
and a (seeded, optionally subsampled) reference set of PCA coordinates with their labels.
:func:`transfer_labels` projects new objects with the stored loadings and takes a majority vote of
their ``k`` nearest reference objects, so a new plate never changes the labels, and therefore the
spatial statistics, of earlier wells. The reference is saved as one ``.npz`` (arrays plus a JSON
header), read back with ``allow_pickle=False``.

Graph without scanpy: the kNN graph (exact below 8192 objects as scanpy, else a faiss HNSW index), UMAP's
fuzzy simplicial set (:func:`umap_connectivities`, scanpy's ``connectivities``) and igraph's Leiden
(:func:`leiden_labels`, seeded as scanpy's ``tl.leiden(flavor='igraph')``) are computed here in numpy, so
clustering never imports scanpy, umap or numba (about 30 s of JIT compilation per process); a test
compares graph and labels with scanpy's. Only ``knn='pynndescent'`` still goes through scanpy.

Scale: above ``max_fit`` objects the fit (standardisation, PCA, kNN graph, Leiden) runs on a seeded uniform
subsample and every other object is labelled by the same kNN vote against the fitted objects, so time grows
linearly and memory beyond the input stays bounded. The kNN graph of large fits comes from a faiss HNSW
index (:class:`FaissKNNTransformer`, no JIT compilation; built single-threaded so that labels are
reproducible) instead of scanpy's pynndescent default.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from .validation import check_choice, check_key, require

logger = logging.getLogger(__name__)

__all__ = ["ClusterReference", "FaissKNNTransformer", "KNN_BACKENDS", "KnnBackend", "REFERENCE_FORMAT",
           "cluster_features", "feature_matrix", "knn_arrays", "leiden_labels", "smooth_knn_dist", "transfer_labels",
           "umap_connectivities"]

#: ``format`` of a saved reference's header; :meth:`ClusterReference.load` refuses any other.
REFERENCE_FORMAT = "phenocoder.cluster_reference/1"
#: kNN graph backends of :func:`cluster_features` (its ``knn`` argument).
KnnBackend = Literal["faiss", "pynndescent", "exact"]
KNN_BACKENDS: tuple[str, ...] = get_args(KnnBackend)
# scanpy computes Euclidean neighbours by brute force below 8192 objects (``use_dense_distances`` in
# ``Neighbors._handle_transformer``); every backend keeps that, so small plates get exactly scanpy's graph.
_EXACT_KNN_BELOW = 8192
_TRANSFER_CHUNK = 65_536  # rows projected and labelled at a time (bounded memory)


@dataclass
class ClusterReference:
    """Everything needed to assign the clusters of a pooled Leiden run to new objects.

    Made by :func:`cluster_features`; saved and read back with :meth:`save` and :meth:`load`.

    Parameters
    ----------
    categories
        Cluster names (``'0'``, ``'1'``, ...); ``ref_labels`` are codes into them.
    var_names
        Feature names, in the order :meth:`transform` expects them.
    source
        Where the features were read: ``{"use_rep": ..., "layer": ...}`` (empty strings for ``.X``).
    scale_mean, scale_std
        Per-feature standardisation, or ``None`` when the fit was not standardised.
    pca_mean
        Mean subtracted before the projection (in standardised units).
    pca_components
        Principal axes, shape (n_pcs, n_features).
    ref_embedding
        PCA coordinates of the reference objects, shape (n_reference, n_pcs), float32.
    ref_labels
        Their cluster codes, shape (n_reference,).
    params
        The settings of the fit (:func:`cluster_features` records them).
    """

    categories: list[str]
    var_names: list[str]
    source: dict[str, Any]
    scale_mean: np.ndarray | None
    scale_std: np.ndarray | None
    pca_mean: np.ndarray
    pca_components: np.ndarray
    ref_embedding: np.ndarray
    ref_labels: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pcs(self) -> int:
        """Number of principal components of the reference space."""
        return int(self.pca_components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Standardise (if fitted so) and project features onto the stored principal axes.

        Parameters
        ----------
        x
            Features, shape (n, len(var_names)), columns in the order of ``var_names``.

        Returns
        -------
        numpy.ndarray
            PCA coordinates, shape (n, n_pcs), float32.

        Raises
        ------
        ValueError
            ``x`` does not have one column per reference feature.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.var_names):
            raise ValueError(f"expected {len(self.var_names)} features per object (as in the reference: "
                             f"{self.var_names[:5]}...), found shape {x.shape}.")
        if self.scale_mean is not None:
            x = (x - self.scale_mean) / self.scale_std
        return ((x - self.pca_mean) @ self.pca_components.T).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        """Write the reference as one ``.npz`` (arrays plus a JSON header; no pickle), atomically.

        Parameters
        ----------
        path
            File to write (replaced if it exists).

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        path = Path(path)
        header = {"format": REFERENCE_FORMAT, "categories": self.categories, "var_names": self.var_names,
                  "source": self.source, "params": self.params, "scaled": self.scale_mean is not None}
        arrays = {"header": np.array(json.dumps(header)), "pca_mean": self.pca_mean,
                  "pca_components": self.pca_components, "ref_embedding": self.ref_embedding,
                  "ref_labels": self.ref_labels}
        if self.scale_mean is not None:
            arrays["scale_mean"] = self.scale_mean
            arrays["scale_std"] = self.scale_std
        from .io import atomic_file

        with atomic_file(path) as tmp, open(tmp, "wb") as fh:  # complete or absent, never half-written
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClusterReference:
        """Read a reference written by :meth:`save` (``allow_pickle=False``).

        Parameters
        ----------
        path
            The ``.npz`` file.

        Returns
        -------
        ClusterReference
            The reference as it was saved.

        Raises
        ------
        FileNotFoundError
            ``path`` does not exist.
        ValueError
            The file's header is not that of a cluster reference.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"cluster reference {str(path)!r} does not exist; write it with "
                                    "ClusterReference.save() after cluster_features().")
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            if header.get("format") != REFERENCE_FORMAT:
                raise ValueError(f"{str(path)!r} is not a cluster reference (format {header.get('format')!r}, "
                                 f"expected {REFERENCE_FORMAT!r}).")
            scaled = header["scaled"]
            return cls(categories=list(header["categories"]), var_names=list(header["var_names"]),
                       source=dict(header["source"]), params=dict(header["params"]),
                       scale_mean=z["scale_mean"] if scaled else None,
                       scale_std=z["scale_std"] if scaled else None,
                       pca_mean=z["pca_mean"], pca_components=z["pca_components"],
                       ref_embedding=z["ref_embedding"], ref_labels=z["ref_labels"])


def feature_matrix(adata, *, use_rep: str | None = None, layer: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Return the features of ``adata`` as a dense float64 matrix, with their names.

    Parameters
    ----------
    adata
        The objects (an AnnData).
    use_rep
        Read ``.obsm[use_rep]`` (names from its DataFrame columns, else ``f"{use_rep}_{i}"``).
    layer
        Read ``.layers[layer]``; with neither ``use_rep`` nor ``layer``, ``.X`` is read.

    Returns
    -------
    x : numpy.ndarray
        float64, shape (n_obs, n_features).
    names : list of str
        Feature names.

    Raises
    ------
    KeyError
        ``use_rep`` or ``layer`` is not in ``adata``.
    TypeError
        The features are not numeric.
    ValueError
        Both ``use_rep`` and ``layer`` are given, ``.X`` is missing, or a feature is NaN or infinite.
    """
    import scipy.sparse as sp

    require(use_rep is None or layer is None,
            f"pass use_rep or layer, not both (got use_rep={use_rep!r}, layer={layer!r}).")
    if use_rep is not None:
        check_key(adata.obsm, use_rep, argument="use_rep", what="key of .obsm")
        x = adata.obsm[use_rep]
        names = list(x.columns.astype(str)) if isinstance(x, pd.DataFrame) else \
            [f"{use_rep}_{i}" for i in range(np.asarray(x).shape[1])]
        x = np.asarray(x)
    else:
        if layer is not None:
            check_key(adata.layers, layer, argument="layer", what="layer")
            x = adata.layers[layer]
        else:
            x = adata.X
            require(x is not None, "the table has no .X; pass layer=... or use_rep=...")
        names = [str(v) for v in adata.var_names]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
    if x.dtype.kind not in "iufb":
        raise TypeError(f"features must be numeric, found dtype {x.dtype}.")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{bad} objects have NaN/inf features; impute or drop them before clustering.")
    return x, names


class FaissKNNTransformer:
    """Approximate Euclidean kNN graph from a faiss HNSW index, usable as ``sc.pp.neighbors(transformer=...)``.

    Follows the :class:`~sklearn.neighbors.KNeighborsTransformer` protocol as scanpy uses it:
    :meth:`fit_transform` returns a CSR matrix with exactly ``n_neighbors`` stored entries per row, in
    ascending distance, the first being the object itself at distance 0; distances are Euclidean (faiss
    returns squared ones). :meth:`transform` gives the ``n_neighbors`` nearest indexed objects of new points.

    Exact duplicates are indexed once (HNSW misses neighbours among many points at distance 0) and expanded
    afterwards: an object's duplicates come first, as stored zeros, then the copies of the next points.

    The index is built with one OpenMP thread (faiss's parallel insertion depends on thread timing; the
    level draws are seeded), so the graph and every label derived from it are identical in any process;
    searches use all threads (queries are independent). A query that finds fewer than the requested
    neighbours is answered by exact search. faiss is imported only when the index is built.

    Parameters
    ----------
    n_neighbors
        Neighbours per object, the object itself included (scanpy's ``n_neighbors``).
    m
        HNSW graph degree (faiss ``M``).
    ef_construction
        HNSW candidate list size while building.
    ef_search
        HNSW candidate list size while searching (at least ``2 * k`` is used).
    """

    def __init__(self, n_neighbors: int = 15, *, m: int = 16, ef_construction: int = 40, ef_search: int = 32):
        self.n_neighbors = n_neighbors
        self.m = m
        self.ef_construction = ef_construction
        self.ef_search = ef_search

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Return the constructor arguments (scanpy reads ``n_neighbors``).

        Parameters
        ----------
        deep
            Ignored (no nested estimators); part of the scikit-learn protocol.

        Returns
        -------
        dict
            ``n_neighbors``, ``m``, ``ef_construction`` and ``ef_search``.
        """
        return {"n_neighbors": self.n_neighbors, "m": self.m, "ef_construction": self.ef_construction,
                "ef_search": self.ef_search}

    def set_params(self, **params: Any) -> FaissKNNTransformer:
        """Set constructor arguments (scikit-learn protocol).

        Parameters
        ----------
        **params
            Constructor arguments by name.

        Returns
        -------
        FaissKNNTransformer
            This transformer.

        Raises
        ------
        ValueError
            A name is not a constructor argument.
        """
        for key, value in params.items():
            require(key in self.get_params(), f"unknown parameter {key!r}; known: {sorted(self.get_params())}.")
            setattr(self, key, value)
        return self

    def fit(self, x, y=None) -> FaissKNNTransformer:
        """Build the HNSW index of the distinct rows of ``x`` (single-threaded, hence deterministic).

        Parameters
        ----------
        x
            Points, shape (n, d), n > ``n_neighbors``; converted to float32.
        y
            Ignored (scikit-learn protocol).

        Returns
        -------
        FaissKNNTransformer
            This transformer, fitted.

        Raises
        ------
        ValueError
            ``x`` is not 2-D or has at most ``n_neighbors`` rows.
        """
        import faiss

        x = np.ascontiguousarray(x, dtype=np.float32)
        require(x.ndim == 2 and x.shape[0] > int(self.n_neighbors) >= 1,
                f"need a 2-D array with more than n_neighbors={self.n_neighbors} rows, found shape {x.shape}.")
        uniq, inverse, counts = np.unique(x, axis=0, return_inverse=True, return_counts=True)
        self.n_samples_fit_ = x.shape[0]
        self.inverse_ = self.members_ = self.starts_ = self.counts_ = None
        if uniq.shape[0] < x.shape[0]:
            x = np.ascontiguousarray(uniq)
            self.inverse_ = inverse.ravel()
            self.counts_ = counts
            self.members_ = np.argsort(self.inverse_, kind="stable")  # objects grouped by distinct row
            self.starts_ = np.concatenate([[0], np.cumsum(counts)[:-1]])
        del uniq
        index = faiss.IndexHNSWFlat(x.shape[1], int(self.m))
        index.hnsw.efConstruction = int(self.ef_construction)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(x)
        finally:
            faiss.omp_set_num_threads(threads)
        self.faiss_index_ = index  # not ``index_``: scanpy treats that attribute as a pynndescent index
        return self

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed (distinct) rows: Euclidean distances and ids, ascending."""
        import faiss

        index = self.faiss_index_
        index.hnsw.efSearch = max(int(self.ef_search), 2 * k)
        d2, idx = index.search(q, k)
        missing = (idx < 0).any(axis=1)
        if missing.any():  # fewer than k reachable: exact search for those rows
            flat = faiss.IndexFlatL2(q.shape[1])
            flat.add(index.reconstruct_n(0, index.ntotal))
            d2[missing], idx[missing] = flat.search(q[missing], k)
        return np.sqrt(np.maximum(d2, 0)), idx.astype(np.int64)

    def _expand(self, dist: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Replace distinct rows by their objects (all copies of a row in object order), first ``k``."""
        if self.members_ is None:
            return dist[:, :k], idx[:, :k]
        m = idx.shape[0]
        counts = self.counts_[idx]
        before = np.cumsum(counts, axis=1) - counts  # objects placed before each column
        out_i = np.empty((m, k), dtype=np.int64)
        out_d = np.empty((m, k), dtype=dist.dtype)
        for j in range(idx.shape[1]):
            start = self.starts_[idx[:, j]]
            for o in range(min(k, int(counts[:, j].max()))):
                pos = before[:, j] + o
                rows = np.flatnonzero((o < counts[:, j]) & (pos < k))
                if rows.size == 0:
                    break
                out_i[rows, pos[rows]] = self.members_[start[rows] + o]
                out_d[rows, pos[rows]] = dist[rows, j]
        return out_d, out_i

    def kneighbors(self, x, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return the Euclidean distances and indices of the nearest indexed objects, ascending.

        Parameters
        ----------
        x
            Query points, shape (m, d).
        n_neighbors
            Neighbours per query (default: the constructor's ``n_neighbors``).

        Returns
        -------
        distances : numpy.ndarray
            Shape (m, n_neighbors), float32.
        indices : numpy.ndarray
            Row numbers of the fitted points, shape (m, n_neighbors), int64.

        Raises
        ------
        ValueError
            ``n_neighbors`` is below 1 or above the number of fitted points.
        """
        k = int(self.n_neighbors if n_neighbors is None else n_neighbors)
        require(1 <= k <= self.n_samples_fit_, f"n_neighbors must be in [1, {self.n_samples_fit_}], found {k}.")
        dist, idx = self._search(np.ascontiguousarray(x, dtype=np.float32), min(k, self.faiss_index_.ntotal))
        return self._expand(dist, idx, k)

    def transform(self, x):
        """Return the kNN distance matrix of new points against the index.

        Parameters
        ----------
        x
            Query points, shape (m, d).

        Returns
        -------
        scipy.sparse.csr_matrix
            Shape (m, n_fitted), ``n_neighbors`` stored entries per row in ascending distance.
        """
        dist, idx = self.kneighbors(x)
        return _knn_csr(dist, idx, self.n_samples_fit_)

    def fit_transform(self, x, y=None):
        """Index ``x`` and return its kNN graph with the self entry first (what scanpy expects).

        Parameters
        ----------
        x
            Points, shape (n, d).
        y
            Ignored (scikit-learn protocol).

        Returns
        -------
        scipy.sparse.csr_matrix
            Shape (n, n), ``n_neighbors`` stored entries per row in ascending distance, the first the
            object itself at distance 0 (stored as an explicit zero).
        """
        self.fit(x)
        n, k = self.n_samples_fit_, int(self.n_neighbors)
        n_rows = self.faiss_index_.ntotal
        dist, idx = _self_first(*self._search(self.faiss_index_.reconstruct_n(0, n_rows), min(k + 1, n_rows)))
        dist, idx = self._expand(dist, idx, k)  # a distinct row's own copies first
        if self.inverse_ is not None:
            dist, idx = dist[self.inverse_], idx[self.inverse_]
        return _knn_csr(*_self_first(dist, idx), n)


def _self_first(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row ``i`` starts with ``i`` at distance 0, then the others in their order (same width)."""
    n, k = idx.shape
    rows = np.arange(n)[:, None]
    # a stable sort moves the self entry, where found, to the end; otherwise the farthest is dropped
    order = np.argsort(idx == rows, axis=1, kind="stable")[:, : k - 1]
    return (np.hstack([np.zeros((n, 1), dist.dtype), np.take_along_axis(dist, order, axis=1)]),
            np.hstack([rows, np.take_along_axis(idx, order, axis=1)]))


def _knn_csr(dist: np.ndarray, idx: np.ndarray, n_cols: int):
    """Row-major kNN CSR (storage order = distance order; explicit zeros kept, as scanpy reads them)."""
    import scipy.sparse as sp

    n, k = idx.shape
    return sp.csr_matrix((dist.astype(np.float32).ravel(), idx.ravel(), np.arange(0, n * k + 1, k)),
                         shape=(n, n_cols))


def _check_scale_args(max_fit: int | None, knn: str) -> None:
    """Check ``max_fit`` (``None`` or an int >= 3; ``True`` is no count) and ``knn`` (a backend name)."""
    require(max_fit is None or (not isinstance(max_fit, bool) and isinstance(max_fit, (int, np.integer))
                                and max_fit >= 3),
            f"max_fit must be None (fit on all objects) or an integer >= 3, found {max_fit!r}.")
    check_choice(knn, KNN_BACKENDS, argument="knn")


def cluster_features(
    adata,
    *,
    use_rep: str | None = None,
    layer: str | None = None,
    scale: bool = True,
    n_pcs: int = 50,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    n_iterations: int = 2,
    seed: int = 0,
    max_reference: int | None = 200_000,
    transfer_k: int = 15,
    max_fit: int | None = 200_000,
    knn: KnnBackend = "faiss",
) -> tuple[pd.Categorical, ClusterReference]:
    """Cluster the objects of all samples together (PCA -> kNN -> Leiden, seeded).

    Parameters
    ----------
    adata
        Objects (all samples pooled). Not modified.
    use_rep, layer
        Features: ``.obsm[use_rep]``, ``.layers[layer]`` or (default) ``.X``.
    scale
        Standardise each feature (mean 0, sd 1, ddof 0; constant features get sd 1) before PCA.
    n_pcs
        Principal components, bounded by ``n_obs - 1`` and ``n_features``.
    n_neighbors, resolution, n_iterations
        scanpy ``pp.neighbors`` and ``tl.leiden(flavor='igraph')`` settings.
    seed
        Seed for the fit subsample, PCA, neighbours, Leiden and the reference subsample.
    max_reference
        Keep at most this many fitted objects (seeded uniform subsample) as the transfer reference.
    transfer_k
        Neighbours voting in :func:`transfer_labels` (and for the objects left out of the fit).
    max_fit
        Fit (standardisation, PCA, kNN graph, Leiden) on at most this many objects: above it, a seeded
        uniform subsample is fitted and every other object gets the majority vote of its ``transfer_k``
        nearest fitted objects in PCA space (as :func:`transfer_labels`), so time grows linearly with the
        number of objects and memory beyond the input is bounded. ``None``: fit all objects.
    knn
        kNN graph backend for fits of at least 8192 objects (below that, every backend uses scanpy's exact
        brute-force search, as scanpy does): ``'faiss'`` (HNSW index, :class:`FaissKNNTransformer`, no JIT
        compilation, reproducible), ``'pynndescent'`` (scanpy's default; about 95 s of numba compilation in
        each new process) or ``'exact'`` (brute force; fine for small fits). With ``'faiss'`` the objects left
        out of the fit are searched in the same index, otherwise exactly.

    Returns
    -------
    labels : pandas.Categorical
        Cluster labels (categories ``'0'``, ``'1'``, ...) in the row order of ``adata``.
    reference : ClusterReference
        What :func:`transfer_labels` needs to label new objects the same way. ``reference.params`` records
        the settings, ``n_objects``, ``n_fit`` (the objects Leiden saw), ``knn`` and ``knn_exact`` (whether
        the graph came from an exact search).

    Raises
    ------
    ValueError
        Fewer than 3 objects, ``max_fit`` or ``knn`` invalid, or features that :func:`feature_matrix` rejects.

    """
    from sklearn.decomposition import PCA

    _check_scale_args(max_fit, knn)

    x, names = feature_matrix(adata, use_rep=use_rep, layer=layer)
    n_objects, f = x.shape
    require(n_objects >= 3, f"clustering needs at least 3 objects, found {n_objects}.")
    rng = np.random.default_rng(seed)
    fit_rows = None
    if max_fit is not None and n_objects > int(max_fit):
        fit_rows = np.sort(rng.choice(n_objects, size=int(max_fit), replace=False))
    xf = x if fit_rows is None else x[fit_rows]
    x_rest = None if fit_rows is None else x  # the objects left out of the fit are labelled from here
    del x
    n = xf.shape[0]
    mean = std = None
    if scale:
        mean = xf.mean(axis=0)
        std = xf.std(axis=0)
        std[~(std > 0)] = 1.0
        xf = (xf - mean) / std
    n_comp = int(max(1, min(n_pcs, n - 1, f)))
    if n_comp < n_pcs:
        logger.info("n_pcs=%d reduced to %d (n_obs=%d, n_features=%d)", n_pcs, n_comp, n, f)
    pca = PCA(n_components=n_comp, svd_solver="full" if min(n, f) <= 1000 else "randomized", random_state=seed)
    emb = pca.fit_transform(xf).astype(np.float32)
    del xf
    k = int(max(2, min(n_neighbors, n - 1)))
    transformer: Any = None
    if knn == "pynndescent" and n >= _EXACT_KNN_BELOW:  # scanpy's own path (pynndescent needs its numba JIT)
        labels = _scanpy_leiden(emb, k, resolution, n_iterations, seed)
    else:
        if knn == "faiss" and n >= _EXACT_KNN_BELOW:
            transformer = FaissKNNTransformer(n_neighbors=k)
            dist = transformer.fit_transform(emb)
        else:  # scanpy's brute-force search (its choice below 8192 objects, and knn="exact")
            from sklearn.neighbors import KNeighborsTransformer

            dist = KNeighborsTransformer(algorithm="brute", n_neighbors=k, metric="euclidean").fit_transform(emb)
        knn_idx, knn_dist = knn_arrays(dist, k)
        graph = umap_connectivities(knn_idx, knn_dist, n_obs=n, n_neighbors=k)
        labels = leiden_labels(graph, resolution=resolution, n_iterations=n_iterations, seed=seed)
    categories = sorted(set(labels), key=lambda s: (len(s), s))
    fit_codes = pd.Categorical(labels, categories=categories).codes.astype(np.int32)
    keep = np.arange(n)
    if max_reference is not None and n > int(max_reference):
        keep = np.sort(rng.choice(n, size=int(max_reference), replace=False))
    source = {"use_rep": use_rep or "", "layer": layer or ""}
    params = {"scale": bool(scale), "n_pcs": n_comp, "n_neighbors": k, "resolution": float(resolution),
              "n_iterations": int(n_iterations), "seed": int(seed), "transfer_k": int(transfer_k),
              "n_fit": int(n), "n_objects": int(n_objects), "n_reference": int(keep.shape[0]),
              "max_fit": None if max_fit is None else int(max_fit), "knn": knn,
              "knn_exact": knn == "exact" or n < _EXACT_KNN_BELOW}
    reference = ClusterReference(categories=categories, var_names=names, source=source, scale_mean=mean,
                                 scale_std=std, pca_mean=pca.mean_.astype(np.float64),
                                 pca_components=pca.components_.astype(np.float64),
                                 ref_embedding=emb[keep], ref_labels=fit_codes[keep], params=params)
    codes = fit_codes
    if fit_rows is not None:  # the objects left out of the fit: kNN vote against all fitted objects
        codes = np.empty(n_objects, dtype=np.int32)
        codes[fit_rows] = fit_codes
        rest = np.setdiff1d(np.arange(n_objects), fit_rows, assume_unique=True)
        kv = max(1, min(int(transfer_k), n))
        search = transformer.kneighbors if isinstance(transformer, FaissKNNTransformer) else _exact_search(emb)
        for start in range(0, rest.shape[0], _TRANSFER_CHUNK):
            rows = rest[start:start + _TRANSFER_CHUNK]
            _, idx = search(reference.transform(x_rest[rows]), kv)
            codes[rows] = _vote(fit_codes[idx], len(categories))[0]
    cat = pd.Categorical.from_codes(codes, categories=categories)
    logger.info("Leiden: %d clusters on %d of %d objects (%d PCs, knn=%s)", len(categories), n, n_objects,
                n_comp, knn)
    return cat, reference


def _scanpy_leiden(emb: np.ndarray, k: int, resolution: float, n_iterations: int, seed: int) -> np.ndarray:
    """Leiden labels through scanpy's ``pp.neighbors`` (pynndescent kNN) and ``tl.leiden(flavor='igraph')``."""
    import anndata as ad

    from ._lazy import import_scanpy

    sc = import_scanpy()
    tmp = ad.AnnData(X=np.zeros((emb.shape[0], 0), dtype=np.float32))
    tmp.obsm["X_pca"] = emb
    sc.pp.neighbors(tmp, n_neighbors=k, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(tmp, resolution=resolution, flavor="igraph", n_iterations=n_iterations, directed=False,
                 random_state=seed, key_added="leiden")
    return tmp.obs["leiden"].astype(str).to_numpy()


def knn_arrays(dist, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the neighbour indices and distances of a kNN distance CSR with a constant count per row, self first.

    Reads the CSR as scanpy does (rows in storage order, the first ``k`` entries; a self column is put
    in front when no row starts with itself). Self distances are set to 0: a brute-force search reports
    rounding residues such as 8e-8, which scanpy zeroes (in place, before its connectivities) and which
    would otherwise count as the nearest neighbour distance ``rho``.

    Parameters
    ----------
    dist
        kNN distance matrix (CSR), the same number of stored entries in every row.
    k
        Neighbours to keep per row, the object itself included.

    Returns
    -------
    indices : numpy.ndarray
        Shape (n, k), the object itself first.
    distances : numpy.ndarray
        Shape (n, k), 0 for the object itself.

    Raises
    ------
    ValueError
        Rows hold different numbers of entries.
    """
    n = dist.shape[0]
    per_row = np.diff(dist.indptr)
    require(per_row.size and (per_row == per_row[0]).all(), "the kNN graph must have the same count per row.")
    idx = dist.indices.reshape(n, int(per_row[0]))
    d = dist.data.reshape(n, int(per_row[0])).copy()
    d[idx == np.arange(n)[:, None]] = 0
    if not (idx[:, 0] == np.arange(n)).any():
        idx = np.hstack([np.arange(n)[:, None], idx])
        d = np.hstack([np.zeros((n, 1), d.dtype), d])
    return idx[:, :k], d[:, :k]


_SMOOTH_K_TOLERANCE = 1e-5
_MIN_K_DIST_SCALE = 1e-3


def smooth_knn_dist(dist: np.ndarray, k: float, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Return per row the bandwidth ``sigma`` and the nearest non-zero distance ``rho`` of UMAP's fuzzy set.

    ``sigma`` solves ``sum_j exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(k)`` (over the neighbours after the
    first) by bisection, at most ``n_iter`` halvings, stopping a row once within 1e-5; local connectivity 1.
    Vectorized over rows with the arithmetic of ``umap.umap_.smooth_knn_dist`` (float32 distances, float64
    sums), so the graph equals the one scanpy builds.

    Parameters
    ----------
    dist
        kNN distances, shape (n, k), ascending per row, the object itself (distance 0) first; float32.
    k
        The ``k`` of the target ``log2(k)``.
    n_iter
        Most bisection steps per row.

    Returns
    -------
    sigma : numpy.ndarray
        float32, shape (n,), at least 1e-3 times the row's mean distance (or the overall mean where
        ``rho`` is 0).
    rho : numpy.ndarray
        float32, shape (n,), 0 for a row without a positive distance.
    """
    n = dist.shape[0]
    target = np.log2(k)
    positive = dist > 0.0
    has = positive.any(axis=1)
    first = np.argmax(positive, axis=1)
    rho = np.zeros(n, np.float32)
    rho[has] = dist[np.flatnonzero(has), first[has]]
    shifted = (dist[:, 1:] - rho[:, None]).astype(np.float64)  # float32 difference, as umap computes it
    over = shifted > 0
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    mid = np.ones(n)
    active = np.ones(n, bool)
    for _ in range(n_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        m = mid[rows, None]
        psum = np.where(over[rows], np.exp(-(shifted[rows] / m)), 1.0).sum(axis=1)
        done = np.abs(psum - target) < _SMOOTH_K_TOLERANCE
        active[rows[done]] = False
        rows, psum = rows[~done], psum[~done]
        above = psum > target
        hi[rows[above]] = mid[rows[above]]
        lo[rows[~above]] = mid[rows[~above]]
        unbounded = ~above & np.isinf(hi[rows])
        mid[rows[unbounded]] *= 2
        mid[rows[~unbounded]] = (lo[rows[~unbounded]] + hi[rows[~unbounded]]) / 2.0
    sigma = mid.astype(np.float32)
    floor = np.where(rho > 0.0, _MIN_K_DIST_SCALE * dist.mean(axis=1, dtype=np.float64),
                     _MIN_K_DIST_SCALE * dist.mean(dtype=np.float64))
    low = sigma < floor
    sigma[low] = floor[low]
    return sigma, rho


def umap_connectivities(knn_idx: np.ndarray, knn_dist: np.ndarray, *, n_obs: int, n_neighbors: int,
                        libm_exp: bool = False):
    """Return UMAP's fuzzy simplicial set of a kNN graph: what scanpy stores as ``connectivities``.

    Membership ``exp(-(d_ij - rho_i) / sigma_i)`` (1 up to the nearest neighbour, 0 on the diagonal), then
    the fuzzy union ``A + A^T - A * A^T``. Needs no umap/numba import, unlike scanpy's ``pp.neighbors``.

    Parameters
    ----------
    knn_idx
        Neighbour indices, shape (n, k), self first (see :func:`knn_arrays`); -1 marks a missing neighbour.
    knn_dist
        Their distances, shape (n, k).
    n_obs
        Number of objects (the matrix is n_obs x n_obs).
    n_neighbors
        The ``k`` of the bandwidth target ``log2(k)``.
    libm_exp
        Compute the memberships with the C library's float32 ``exp`` (a numba kernel,
        :func:`phenocoder_lib.umap_layout.membership_strengths`), as umap does: the graph is then
        bit-identical to scanpy's, not only within 1e-6 (numpy's vectorized ``exp`` differs in the last bit).
        The embedding uses it (a UMAP layout amplifies last-bit differences); clustering does not need it.

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric connectivities in [0, 1], zero diagonal.
    """
    import scipy.sparse as sp

    dist = np.asarray(knn_dist, np.float32)
    idx = np.asarray(knn_idx)
    sigma, rho = smooth_knn_dist(dist, float(n_neighbors))
    diff = dist - rho[:, None]
    if libm_exp:
        from .umap_layout import membership_strengths

        vals = membership_strengths(np.ascontiguousarray(diff, np.float32), sigma)
    else:
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            vals = np.exp(-(diff / sigma[:, None])).astype(np.float32)
    vals[(diff <= 0.0) | (sigma[:, None] == 0.0)] = 1.0
    vals[idx == np.arange(idx.shape[0])[:, None]] = 0.0
    keep = (idx != -1).ravel()
    rows = np.repeat(np.arange(idx.shape[0], dtype=np.int32), idx.shape[1])[keep]
    a = sp.coo_matrix((vals.ravel()[keep], (rows, idx.ravel()[keep].astype(np.int32))), shape=(n_obs, n_obs))
    a.eliminate_zeros()
    at = a.transpose()
    prod = a.multiply(at)
    out = 1.0 * (a + at - prod) + 0.0 * prod  # set_op_mix_ratio 1: the fuzzy union, in scipy's entry order
    out.eliminate_zeros()
    return out.tocsr()


class _LegacyRNG:
    """igraph's random source backed by ``numpy.random.RandomState(seed)``, as scanpy seeds Leiden."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.RandomState(seed)

    def getrandbits(self, k: int) -> int:
        return self._rng.tomaxint() & ((1 << k) - 1)

    def randint(self, a: int, b: int) -> int:
        return self._rng.randint(a, b + 1)

    def gauss(self, mu: float, sigma: float) -> float:
        return self._rng.normal(mu, sigma)

    def random(self) -> float:
        return self._rng.random()


def leiden_labels(graph, *, resolution: float, n_iterations: int, seed: int) -> np.ndarray:
    """Return the Leiden clusters (igraph, modularity, weighted) of a symmetric graph.

    The graph is built as scanpy's ``tl.leiden(flavor='igraph')`` builds it (every stored non-zero entry an
    edge, so each pair twice) with the same seeded random source, so the labels are scanpy's.

    Parameters
    ----------
    graph
        Symmetric sparse matrix of edge weights (e.g. :func:`umap_connectivities`).
    resolution
        Modularity resolution; higher gives more clusters.
    n_iterations
        Leiden iterations (negative: until stable).
    seed
        Seed of igraph's random source (``numpy.random.RandomState(seed)``, as scanpy seeds it).

    Returns
    -------
    numpy.ndarray
        One label per node, as strings ``'0'``, ``'1'``, ...
    """
    import random

    import igraph as ig

    coo = graph.tocoo()
    nz = coo.data != 0
    g = ig.Graph(n=graph.shape[0], directed=False)
    g.add_edges(np.column_stack([coo.row[nz], coo.col[nz]]))
    g.es["weight"] = coo.data[nz].astype(np.float64)
    ig.set_random_number_generator(_LegacyRNG(int(seed)))
    try:
        part = g.community_leiden(objective_function="modularity", weights="weight", resolution=resolution,
                                  n_iterations=n_iterations)
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(part.membership).astype(str)


def _exact_search(ref_embedding: np.ndarray):
    """``search(queries, k) -> (distances, indices)``: exact nearest reference objects."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors().fit(ref_embedding)
    return lambda queries, k: nn.kneighbors(queries, n_neighbors=k)


def _vote(votes_lab: np.ndarray, n_cat: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority label per row of ``votes_lab`` (m, k; neighbours by distance) and its vote count.

    Ties go to the label of the nearest tied neighbour.
    """
    m, k = votes_lab.shape
    counts = np.zeros((m, n_cat), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(m), k), votes_lab.ravel()), 1)
    best = counts.max(axis=1)
    tied = counts == best[:, None]
    # nearest neighbour whose label is among the tied winners
    first = np.argmax(tied[np.arange(m)[:, None], votes_lab], axis=1)
    return votes_lab[np.arange(m), first], best


def transfer_labels(reference: ClusterReference, adata=None, *, x: np.ndarray | None = None,
                    k: int | None = None) -> tuple[pd.Categorical, np.ndarray]:
    """Label new objects with the reference clusters (kNN majority vote in the reference PCA space).

    Parameters
    ----------
    reference
        From :func:`cluster_features` (or :meth:`ClusterReference.load`).
    adata
        New objects; features are read as recorded in the reference (``use_rep``/``layer``/``.X``)
        and must have the same feature names in the same order.
    x
        Alternatively, the feature matrix itself.
    k
        Voting neighbours (default: the reference's ``transfer_k``).

    Returns
    -------
    labels : pandas.Categorical
        Labels with the reference categories; ties go to the label of the nearest tied neighbour.
    confidence : numpy.ndarray
        The winner's fraction of the ``k`` votes, per object.

    Raises
    ------
    ValueError
        Neither or both of ``adata`` and ``x`` are given, or the features differ from the reference's.

    """
    require((adata is None) != (x is None), "pass either adata or x.")
    if adata is not None:
        src = reference.source
        x, names = feature_matrix(adata, use_rep=src.get("use_rep") or None, layer=src.get("layer") or None)
        if not src.get("use_rep") and names != reference.var_names:
            raise ValueError(f"features differ from the reference: expected {reference.var_names[:5]}... "
                             f"({len(reference.var_names)}), found {names[:5]}... ({len(names)}).")
    emb = reference.transform(x)
    k = int(reference.params.get("transfer_k", 15) if k is None else k)
    k = max(1, min(k, reference.ref_embedding.shape[0]))
    _, idx = _exact_search(reference.ref_embedding)(emb, k)
    winner, best = _vote(reference.ref_labels[idx], len(reference.categories))
    labels = pd.Categorical.from_codes(winner, categories=reference.categories)
    return labels, best / k
