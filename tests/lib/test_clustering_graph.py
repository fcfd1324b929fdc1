"""The clustering graph without scanpy: kNN arrays, UMAP connectivities and Leiden, checked against scanpy.

The fast tests check the fuzzy simplicial set from its definition and that ``cluster_features`` never imports
scanpy, umap or numba; the slow ones build the same graph and labels with scanpy and compare.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

from phenocoder_lib.clustering import FaissKNNTransformer, knn_arrays, leiden_labels, umap_connectivities


def _planted(n, *, d=12, n_clusters=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=6.0, size=(n_clusters, d))
    return (centers[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _exact_graph(x, k):
    from sklearn.neighbors import KNeighborsTransformer

    return KNeighborsTransformer(algorithm="brute", n_neighbors=k).fit_transform(x)


# ---------------------------------------------------------------------------------------------- fast
def test_connectivities_follow_the_fuzzy_union_definition():
    x = _planted(400, seed=1)
    k = 10
    idx, dist = knn_arrays(_exact_graph(x, k), k)
    assert idx.shape == dist.shape == (400, k)
    np.testing.assert_array_equal(idx[:, 0], np.arange(400))
    assert (dist[:, 0] == 0).all() and (np.diff(dist, axis=1) >= 0).all()
    g = umap_connectivities(idx, dist, n_obs=400, n_neighbors=k)
    # membership from the definition: rho = nearest non-self distance, sigma solving sum = log2(k)
    rho = dist[:, 1]
    from phenocoder_lib.clustering import smooth_knn_dist

    sigma, rho_lib = smooth_knn_dist(dist.astype(np.float32), float(k))
    np.testing.assert_allclose(rho_lib, rho, rtol=1e-6)
    sums = np.exp(-np.maximum(dist[:, 1:] - rho[:, None], 0) / sigma[:, None].astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(sums, np.log2(k), atol=1e-4)
    a = np.zeros((400, 400))
    rows = np.repeat(np.arange(400), k - 1)
    a[rows, idx[:, 1:].ravel()] = np.exp(-np.maximum(dist[:, 1:] - rho[:, None], 0) / sigma[:, None]).ravel()
    expected = a + a.T - a * a.T
    dense = g.toarray()
    np.testing.assert_allclose(dense, expected, atol=1e-6)
    assert sp.isspmatrix_csr(g) and (dense == dense.T).all() and (np.diag(dense) == 0).all()
    assert dense.max() <= 1.0
    np.testing.assert_allclose(dense[idx[:, 1], np.arange(400)], 1.0, atol=1e-6)  # the nearest neighbour: 1


def test_leiden_labels_are_seeded_and_find_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(2)
    centers = rng.normal(scale=8.0, size=(5, 12))
    truth = rng.integers(0, 5, 1500)
    x = (centers[truth] + rng.normal(size=(1500, 12))).astype(np.float32)
    g = umap_connectivities(*knn_arrays(_exact_graph(x, 15), 15), n_obs=1500, n_neighbors=15)
    labels = leiden_labels(g, resolution=0.3, n_iterations=2, seed=0)
    assert labels.dtype.kind == "U" and adjusted_rand_score(truth, labels) > 0.95
    np.testing.assert_array_equal(labels, leiden_labels(g, resolution=0.3, n_iterations=2, seed=0))
    import random

    import igraph as ig

    ig.set_random_number_generator(random)  # the global source was restored: plain calls still work
    assert len(set(leiden_labels(g, resolution=3.0, n_iterations=2, seed=1))) > len(set(labels))


def test_knn_arrays_adds_a_missing_self_column_and_rejects_ragged_rows():
    d = sp.csr_matrix((np.array([1.0, 2.0, 1.0, 3.0, 2.0, 3.0]), np.array([1, 2, 0, 2, 0, 1]), np.arange(0, 7, 2)),
                      shape=(3, 3))
    idx, dist = knn_arrays(d, 2)
    np.testing.assert_array_equal(idx, [[0, 1], [1, 0], [2, 0]])
    np.testing.assert_array_equal(dist, [[0, 1], [0, 1], [0, 2]])
    ragged = sp.csr_matrix((np.ones(3), np.array([1, 0, 2]), np.array([0, 1, 1, 3])), shape=(3, 3))
    with pytest.raises(ValueError, match="same count per row"):
        knn_arrays(ragged, 2)


def test_cluster_features_imports_neither_scanpy_nor_umap_nor_numba():
    code = ("import sys, numpy as np, anndata as ad; from phenocoder_lib.clustering import cluster_features;"
            "r = np.random.default_rng(0); x = r.normal(size=(9000, 8)).astype('float32');"
            "labels, ref = cluster_features(ad.AnnData(x), resolution=0.5);"
            "bad = [m for m in ('scanpy', 'umap', 'numba', 'pynndescent') if m in sys.modules];"
            "print(len(labels), ref.params['knn_exact'], bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "9000 False []"


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow  # imports scanpy and umap (numba compilation, tens of seconds)
@pytest.mark.parametrize(("n", "backend"), [(3000, "exact"), (9000, "faiss")])
def test_graph_and_labels_equal_scanpys(n, backend, monkeypatch):
    import anndata as ad

    from phenocoder_lib.clustering import cluster_features

    # umap imports its parametric (TensorFlow) part on import; blocked while scanpy and umap are imported, as
    # the library does (umap handles the ImportError), so this test does not load TensorFlow
    with monkeypatch.context() as patch:
        if "umap" not in sys.modules and "tensorflow" not in sys.modules:
            patch.setitem(sys.modules, "umap.parametric_umap", None)
        import scanpy as sc
    x = _planted(n, seed=3)
    labels, ref = cluster_features(ad.AnnData(x), resolution=0.8, seed=2)
    emb = ref.transform(x)
    np.testing.assert_array_equal(emb, ref.ref_embedding)
    tmp = ad.AnnData(np.zeros((n, 0), np.float32))
    tmp.obsm["X_pca"] = emb
    transformer = FaissKNNTransformer(n_neighbors=15) if backend == "faiss" else None
    sc.pp.neighbors(tmp, n_neighbors=15, use_rep="X_pca", random_state=2, transformer=transformer)
    sc.tl.leiden(tmp, resolution=0.8, flavor="igraph", n_iterations=2, directed=False, random_state=2)
    dist = FaissKNNTransformer(n_neighbors=15).fit_transform(emb) if backend == "faiss" else _exact_graph(emb, 15)
    ours = umap_connectivities(*knn_arrays(dist, 15), n_obs=n, n_neighbors=15)
    theirs = tmp.obsp["connectivities"]
    np.testing.assert_array_equal(ours.indptr, theirs.indptr)
    np.testing.assert_array_equal(ours.indices, theirs.indices)
    np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-6)  # float32 exp: at most an ulp apart
    np.testing.assert_array_equal(np.asarray(labels).astype(str), tmp.obs["leiden"].astype(str).to_numpy())
    assert len(labels.categories) >= 4
