"""Pooled clustering at scale: bounded fit (``max_fit``) and the kNN backends (``knn``).

``cluster_features`` builds its graph without scanpy (no numba compilation), so only the pynndescent backend,
which goes through scanpy, is marked slow.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import clustering
from phenocoder_lib.clustering import FaissKNNTransformer, cluster_features, transfer_labels


def _planted(n, *, d=16, n_clusters=6, seed=0, spread=8.0):
    """Gaussian clusters with planted labels (well separated, unit noise)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=spread, size=(n_clusters, d))
    truth = rng.integers(0, n_clusters, n)
    return (centers[truth] + rng.normal(size=(n, d))).astype(np.float32), truth


def _table(x):
    adata = ad.AnnData(x, obs=pd.DataFrame(index=[f"o{i}" for i in range(len(x))]))
    adata.var_names = [f"f{i}" for i in range(x.shape[1])]
    return adata


def _ari(truth, labels):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(truth, np.asarray(labels.astype(str)))


# ---------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_fit": 0}, r"max_fit must be None .* or an integer >= 3, found 0"),
    ({"max_fit": 2}, r"max_fit must be None .* or an integer >= 3, found 2"),
    ({"max_fit": True}, r"max_fit must be None .* or an integer >= 3, found True"),
    ({"max_fit": 10.5}, r"max_fit must be None .* or an integer >= 3, found 10.5"),
    ({"knn": "bogus"}, r"knn=.bogus. is not valid; choose one of \[.faiss., .pynndescent., .exact.\]"),
])
def test_bad_arguments_name_the_argument_and_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster_features(_table(np.zeros((5, 2), np.float32)), **kwargs)


def test_faiss_transformer_recall_self_first_euclidean():
    from sklearn.neighbors import NearestNeighbors

    x, _ = _planted(6000, n_clusters=10, seed=1)
    k = 15
    graph = FaissKNNTransformer(n_neighbors=k).fit_transform(x)
    assert graph.shape == (6000, 6000) and np.all(np.diff(graph.indptr) == k)  # k per row, self included
    idx, dist = graph.indices.reshape(-1, k), graph.data.reshape(-1, k)
    assert np.array_equal(idx[:, 0], np.arange(6000)) and np.all(dist[:, 0] == 0)
    assert np.all(np.diff(dist, axis=1) >= 0)  # storage order is distance order
    exact_d, exact_i = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    recall = np.mean([len(set(a[1:]) & set(b[1:])) for a, b in zip(idx, exact_i, strict=True)]) / (k - 1)
    assert recall >= 0.95, recall
    # Euclidean (not squared) distances
    np.testing.assert_allclose(dist[:, 1:], np.linalg.norm(x[idx[:, 1:]] - x[:, None, :], axis=2),
                               rtol=1e-4, atol=1e-4)
    # scanpy reads it with its fast path and keeps our neighbours
    from scanpy.neighbors._common import _get_indices_distances_from_sparse_matrix

    got_i, got_d = _get_indices_distances_from_sparse_matrix(graph, k)
    assert np.array_equal(got_i, idx) and np.array_equal(got_d, dist)
    # new points: k nearest indexed objects
    new = FaissKNNTransformer(n_neighbors=5).fit(x).transform(x[:3] + 0.01)
    assert new.shape == (3, 6000) and new.nnz == 15
    assert np.mean(np.isclose(dist[:, 1], exact_d[:, 1], rtol=1e-4)) >= 0.99  # nearest other object found


def test_faiss_transformer_duplicates_keep_self_first_and_zero_distances():
    from sklearn.neighbors import NearestNeighbors

    base, _ = _planted(200, d=4, seed=2)
    x = np.vstack([base] * 30)  # every point 30 times
    k = 10
    graph = FaissKNNTransformer(n_neighbors=k).fit_transform(x)
    idx, dist = graph.indices.reshape(-1, k), graph.data.reshape(-1, k)
    assert np.array_equal(idx[:, 0], np.arange(len(x)))
    assert np.all(dist == 0)  # 29 exact duplicates each: all neighbours at distance 0, stored explicitly
    assert np.all((idx[:, 1:] % 200) == (np.arange(len(x)) % 200)[:, None])  # neighbours are its copies
    assert all(len(set(row)) == k for row in idx)  # self never repeated
    # mixed multiplicities (1, 3 or 40 copies): the same distances as exact search, copies counted
    copies = np.random.default_rng(3).choice([1, 3, 40], size=200)
    x = np.repeat(base, copies, axis=0)[np.random.default_rng(4).permutation(int(copies.sum()))]
    model = FaissKNNTransformer(n_neighbors=k)
    graph = model.fit_transform(x)
    idx, dist = graph.indices.reshape(-1, k), graph.data.reshape(-1, k)
    assert np.array_equal(idx[:, 0], np.arange(len(x))) and all(len(set(row)) == k for row in idx)
    exact_d, _ = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    assert np.mean(np.all(np.isclose(dist, exact_d, atol=1e-5), axis=1)) >= 0.99
    np.testing.assert_allclose(dist, np.linalg.norm(x[idx] - x[:, None, :], axis=2), atol=1e-5)
    new_d, new_i = model.kneighbors(base[:20] + 1e-3, 12)
    assert new_i.shape == (20, 12) and all(len(set(row)) == 12 for row in new_i)
    want_d, _ = NearestNeighbors(n_neighbors=12).fit(x).kneighbors(base[:20] + 1e-3)
    assert np.all(new_d >= want_d - 1e-5)  # approximate: never closer than exact, copies counted
    assert np.mean(np.all(np.isclose(new_d, want_d, atol=1e-5), axis=1)) >= 0.9


def test_faiss_build_is_single_threaded_and_restores_threads(monkeypatch):
    import faiss

    before = faiss.omp_get_max_threads()
    seen = []

    class Spy(faiss.IndexHNSWFlat):
        def add(self, x):
            seen.append(faiss.omp_get_max_threads())
            return super().add(x)

    monkeypatch.setattr(faiss, "IndexHNSWFlat", Spy)
    FaissKNNTransformer(n_neighbors=3).fit(np.random.default_rng(0).normal(size=(50, 3)))
    assert seen == [1] and faiss.omp_get_max_threads() == before

    class Broken(faiss.IndexHNSWFlat):
        def add(self, x):
            raise RuntimeError("boom")

    monkeypatch.setattr(faiss, "IndexHNSWFlat", Broken)
    with pytest.raises(RuntimeError, match="boom"):
        FaissKNNTransformer(n_neighbors=3).fit(np.random.default_rng(0).normal(size=(50, 3)))
    assert faiss.omp_get_max_threads() == before


_GRAPH_HASH = (
    "import hashlib, numpy as np, faiss; faiss.omp_set_num_threads(2);"
    "from phenocoder_lib.clustering import FaissKNNTransformer;"
    "r = np.random.default_rng(5); c = r.normal(scale=6, size=(12, 16));"
    "x = (c[r.integers(0, 12, 8000)] + r.normal(size=(8000, 16))).astype('float32');"
    "g = FaissKNNTransformer(n_neighbors=15).fit_transform(x);"
    "print(hashlib.sha256(g.indices.tobytes() + g.data.tobytes()).hexdigest())"
)


def _last_lines_of_two_fresh_processes(code: str, timeout: int) -> set[str]:
    lines = set()
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        lines.add(proc.stdout.strip().splitlines()[-1])
    return lines


def test_faiss_graph_is_identical_in_fresh_processes():
    digests = _last_lines_of_two_fresh_processes(_GRAPH_HASH, timeout=120)
    assert len(digests) == 1, digests
    # and in this process, twice
    x, _ = _planted(3000, seed=5)
    g1, g2 = (FaissKNNTransformer(n_neighbors=15).fit_transform(x) for _ in range(2))
    assert hashlib.sha256(g1.indices.tobytes() + g1.data.tobytes()).digest() == \
        hashlib.sha256(g2.indices.tobytes() + g2.data.tobytes()).digest()


def test_faiss_is_imported_lazily():
    code = ("import sys; import phenocoder_lib.clustering; t = phenocoder_lib.clustering.FaissKNNTransformer(3);"
            "sys.exit(1 if 'faiss' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- cluster_features
def test_max_fit_fits_a_subsample_and_labels_every_row():
    x, truth = _planted(3000, seed=3)
    adata = _table(x)
    labels, ref = cluster_features(adata, resolution=0.2, max_fit=1000, max_reference=400, knn="exact", seed=4)
    assert len(labels) == 3000 and not labels.isna().any()
    assert ref.params["n_fit"] == 1000 and ref.params["n_objects"] == 3000 and ref.params["max_fit"] == 1000
    assert ref.params["n_reference"] == 400 and ref.ref_embedding.shape[0] == 400
    assert _ari(truth, labels) >= 0.9
    # the fit is exactly a full fit of the seeded subsample
    fit_rows = np.sort(np.random.default_rng(4).choice(3000, size=1000, replace=False))
    sub_labels, sub_ref = cluster_features(adata[fit_rows].copy(), resolution=0.2, knn="exact", seed=4)
    assert list(labels[fit_rows]) == list(sub_labels)
    np.testing.assert_array_equal(ref.pca_components, sub_ref.pca_components)
    # the others: the transfer vote against all fitted objects
    all_labels, all_ref = cluster_features(adata, resolution=0.2, max_fit=1000, max_reference=None, knn="exact",
                                           seed=4)
    assert list(all_labels) == list(labels)  # the reference size does not change the labels
    rest = np.setdiff1d(np.arange(3000), fit_rows)
    moved, _ = transfer_labels(all_ref, x=x[rest])
    assert list(moved) == list(labels[rest])
    # reproducible
    again, ref2 = cluster_features(adata, resolution=0.2, max_fit=1000, max_reference=400, knn="exact", seed=4)
    assert list(again) == list(labels)
    np.testing.assert_array_equal(ref2.ref_embedding, ref.ref_embedding)


def test_max_fit_at_or_above_n_is_the_full_fit():
    x, _ = _planted(600, seed=6)
    adata = _table(x)
    base, ref = cluster_features(adata, resolution=0.3, max_fit=None, max_reference=300)
    for max_fit in (600, 10_000):
        labels, other = cluster_features(adata, resolution=0.3, max_fit=max_fit, max_reference=300)
        assert list(labels) == list(base)
        assert other.params["n_fit"] == other.params["n_objects"] == 600
        np.testing.assert_array_equal(other.ref_embedding, ref.ref_embedding)
        np.testing.assert_array_equal(other.ref_labels, ref.ref_labels)


@pytest.mark.parametrize("knn", ["faiss", "exact"])
def test_planted_clusters_recovered_with_the_graph_backend(knn, monkeypatch):
    monkeypatch.setattr(clustering, "_EXACT_KNN_BELOW", 0)  # use the backend's graph at this small size
    x, truth = _planted(3000, seed=7)
    labels, ref = cluster_features(_table(x), resolution=0.2, knn=knn, max_fit=2000)
    assert ref.params["knn"] == knn and ref.params["knn_exact"] == (knn == "exact")
    assert _ari(truth, labels) >= 0.9
    again, _ = cluster_features(_table(x), resolution=0.2, knn=knn, max_fit=2000)
    assert list(again) == list(labels)


@pytest.mark.slow  # pynndescent's JIT (about 95 s per process) above scanpy's 8192-object exact limit
def test_planted_clusters_recovered_with_pynndescent():
    x, truth = _planted(9000, seed=8)
    labels, ref = cluster_features(_table(x), resolution=0.2, knn="pynndescent")
    assert ref.params["knn"] == "pynndescent" and not ref.params["knn_exact"]
    assert _ari(truth, labels) >= 0.9


_LABELS_HASH = (
    "import hashlib, numpy as np, anndata as ad;"
    "from phenocoder_lib.clustering import cluster_features;"
    "r = np.random.default_rng(9); c = r.normal(scale=8, size=(6, 16));"
    "x = (c[r.integers(0, 6, 12000)] + r.normal(size=(12000, 16))).astype('float32');"
    "labels, ref = cluster_features(ad.AnnData(x), resolution=0.5, max_fit=10000);"
    "print(ref.params['n_fit'], len(labels.categories),"
    " hashlib.sha256(np.asarray(labels.codes).tobytes()).hexdigest())"
)


def test_faiss_labels_are_identical_in_fresh_processes():
    outputs = _last_lines_of_two_fresh_processes(_LABELS_HASH, timeout=600)
    assert len(outputs) == 1, outputs
    assert next(iter(outputs)).startswith("10000 ")
