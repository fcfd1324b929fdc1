"""The embedding without scanpy, umap's package import or pynndescent: the same numbers as scanpy's path."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import phenocoder_lib.embedding as embedding
from phenocoder_lib.spatial import EmbeddingWarning
from phenocoder_lib.umap_layout import find_ab_params, umap_layout

REPO = Path(__file__).resolve().parents[2]


def _table(n: int, seed: int, n_features: int = 12) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_features))
    x[: n // 2] += 3.0  # two groups: with 15 neighbours the graph may split into two components
    x[rng.random(x.shape) < 0.05] = np.nan  # missing statistics, imputed by the embedding
    return ad.AnnData(x, obs=pd.DataFrame(index=[f"well_{i}" for i in range(n)]))


def _embed(table: ad.AnnData, *, scanpy: bool, **kwargs) -> ad.AnnData:
    previous = embedding._SCANPY_FREE_BELOW
    embedding._SCANPY_FREE_BELOW = 0 if scanpy else previous
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmbeddingWarning)
            return embedding.spatialgraph_embedding(table, 8, **kwargs)
    finally:
        embedding._SCANPY_FREE_BELOW = previous


@pytest.mark.slow  # the scanpy reference imports umap and pynndescent (numba compilation)
@pytest.mark.parametrize(("n", "seed", "n_neighbors"), [(3, 0, 15), (9, 1, 15), (300, 2, 15), (1500, 3, 10)])
def test_the_embedding_without_scanpy_equals_scanpy_bit_for_bit(n, seed, n_neighbors):
    """PCA, kNN distances, connectivities, UMAP coordinates and their ``uns`` records, for 3 rows (UMAP from
    the first two PCs), 9 (below spectral initialisation) and hundreds (spectral, two graph components)."""
    table = _table(n, seed)
    fast = _embed(table, scanpy=False, seed=seed, n_neighbors=n_neighbors)
    ref = _embed(table, scanpy=True, seed=seed, n_neighbors=n_neighbors)
    for key in ("X_pca", "X_umap"):
        assert fast.obsm[key].dtype == ref.obsm[key].dtype
        np.testing.assert_array_equal(fast.obsm[key], ref.obsm[key])
    np.testing.assert_array_equal(fast.varm["PCs"], ref.varm["PCs"])
    assert fast.uns["pca"]["params"] == ref.uns["pca"]["params"]
    for key in ("variance", "variance_ratio"):
        np.testing.assert_array_equal(fast.uns["pca"][key], ref.uns["pca"][key])
    assert fast.uns["neighbors"] == ref.uns["neighbors"]
    assert fast.uns["umap"] == ref.uns["umap"]
    dist_f, dist_r = fast.obsp["distances"], ref.obsp["distances"]
    assert dist_f.dtype == dist_r.dtype and (dist_f != dist_r).nnz == 0
    np.testing.assert_array_equal(dist_f.indptr, dist_r.indptr)
    # scanpy's tl.umap zeroes the edges too weak to be sampled in the stored graph itself (it prunes a COO
    # view sharing the data array); the graph kept here is the one pp.neighbors built: equal everywhere else
    conn_f, conn_r = fast.obsp["connectivities"].toarray(), ref.obsp["connectivities"].toarray()
    pruned = (conn_r == 0) & (conn_f > 0)
    assert (conn_f[pruned] < conn_f.max() / 500).all()
    np.testing.assert_array_equal(conn_f[~pruned], conn_r[~pruned])
    assert fast.uns["spatialgraph_embedding"] == ref.uns["spatialgraph_embedding"]


@pytest.mark.slow
def test_layout_equals_umap_for_every_initialisation():
    import scanpy as sc
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 6))
    x[:200] += 8.0
    table = ad.AnnData(x)
    sc.pp.pca(table, n_comps=4, svd_solver="full", random_state=0)
    sc.pp.neighbors(table, n_neighbors=10, use_rep="X_pca", random_state=0)
    graph = table.obsp["connectivities"].copy()
    start = np.repeat(table.obsm["X_pca"][:200, :2], 2, axis=0)  # coincident starting points get jittered
    for init, seed in [("spectral", 0), ("random", 4), (start, 7)]:
        sc.tl.umap(table, min_dist=0.1, random_state=seed, init_pos=init)
        coords, params = umap_layout(graph, table.obsm["X_pca"], init=init, seed=seed)
        np.testing.assert_array_equal(coords, table.obsm["X_umap"])
        assert params == table.uns["umap"]["params"]
    from umap.umap_ import find_ab_params as umaps

    for spread, min_dist in [(1.0, 0.5), (2.0, 0.05)]:
        assert find_ab_params(spread, min_dist) == tuple(float(v) for v in umaps(spread, min_dist))


def test_layout_arguments_are_checked():
    from scipy.sparse import csr_matrix

    graph = csr_matrix(np.ones((4, 4)) - np.eye(4))
    with pytest.raises(ValueError, match="init='pca': pass 'spectral', 'random' or an array"):
        umap_layout(graph, np.zeros((4, 2)), init="pca")
    with pytest.raises(ValueError, match=r"init has shape \(3, 2\); expected \(4, 2\)"):
        umap_layout(graph, np.zeros((4, 2)), init=np.zeros((3, 2)))


_FRESH = """
import json, sys, time, warnings
import anndata as ad, numpy as np
from phenocoder_lib.embedding import spatialgraph_embedding
x = np.random.default_rng(0).normal(size=(60, 10))
t = time.perf_counter()
out = spatialgraph_embedding(ad.AnnData(x), 4, n_neighbors=10)
seconds = time.perf_counter() - t
loaded = sorted(m for m in ("scanpy", "umap.umap_", "pynndescent", "tensorflow") if m in sys.modules)
deferred = type(sys.modules["umap"]).__name__
import umap  # the package behaves as if nothing happened: its __init__ runs on first use
import umap.layouts
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fitted = umap.UMAP(n_neighbors=5, n_epochs=20, random_state=0).fit_transform(x)
print(json.dumps({"loaded": loaded, "seconds": seconds, "finite": bool(np.isfinite(out.obsm["X_umap"]).all()),
                  "deferred": deferred, "after": type(umap).__name__, "version": umap.__version__,
                  "fitted": list(fitted.shape), "layouts": callable(umap.layouts.optimize_layout_euclidean),
                  "tensorflow": "tensorflow" in sys.modules, "pynndescent": "pynndescent" in sys.modules}))
"""


@pytest.mark.slow  # the second half runs the real umap/__init__ (pynndescent's compilation)
def test_a_fresh_process_embeds_without_scanpy_umap_or_pynndescent_and_umap_still_imports():
    proc = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["finite"] and out["deferred"] == "_DeferredPackage"
    assert out["after"] == "module" and out["version"] and out["fitted"] == [60, 2] and out["layouts"]
    assert out["pynndescent"] and not out["tensorflow"]  # umap's own __init__ ran, parametric_umap kept out
