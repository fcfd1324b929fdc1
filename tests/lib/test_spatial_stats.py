"""Per-sample statistics: brute-force references, naming, NaN rules, estimator, validation."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import ConvexHull

from phenocoder_lib.spatial import SpatialStatsWarning
from phenocoder_lib.spatial.stats import (
    VALID_STATS,
    enrichment_moments,
    feature_names,
    is_feature_column,
    sample_spatial_stats,
)

try:  # tests/lib may or may not be a package
    from .spatial_fixtures import one_sample
except ImportError:
    from spatial_fixtures import one_sample


def _dense_adjacency(x, r):
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    a = d2 <= r * r
    np.fill_diagonal(a, False)
    return a


def _naive_kcore(adj, k):
    alive = np.ones(adj.shape[0], bool)
    changed = True
    while changed:
        deg = (adj & alive[None, :]).sum(axis=1)
        drop = alive & (deg < k)
        changed = bool(drop.any())
        alive &= ~drop
    return alive


def _naive_components(adj, alive):
    comp = -np.ones(adj.shape[0], int)
    c = 0
    for s in range(adj.shape[0]):
        if not alive[s] or comp[s] >= 0:
            continue
        stack = [s]
        comp[s] = c
        while stack:
            v = stack.pop()
            for u in np.flatnonzero(adj[v] & alive):
                if comp[u] < 0:
                    comp[u] = c
                    stack.append(u)
        c += 1
    return comp


def _brute_chull(x, labels, r, min_nds, min_degree, same_label_of=None):
    adj = _dense_adjacency(x, r)
    if same_label_of is not None:
        sel = labels == same_label_of
        adj = adj & sel[:, None] & sel[None, :]
        alive = _naive_kcore(adj, min_degree) & sel
    else:
        alive = _naive_kcore(adj, min_degree)
    comp = _naive_components(adj, alive)
    center = x.mean(axis=0)
    rows = []
    for c in range(comp.max() + 1):
        pts = x[comp == c]
        if pts.shape[0] < min_nds:
            continue
        h = ConvexHull(pts)
        rows.append([h.volume, h.area, pts.shape[0], np.linalg.norm(pts.mean(0) - center), pts.shape[0] / h.volume])
    return np.array(rows).reshape(-1, 5)


@pytest.mark.parametrize("dims", [2, 3])
def test_chull_and_connectivity_against_brute_force(dims):
    adata = one_sample(260, n_clusters=3, dims=dims, side=60.0 if dims == 3 else 40.0, seed=dims)
    r = 14.0 if dims == 3 else 5.0
    row = sample_spatial_stats(adata, radii=(r,), stats=["chull", "connectivity"], chull_min_nds=5,
                               chull_min_degree=2).iloc[0]
    x = adata.obsm["spatial"]
    labels = adata.obs["leiden"].astype(str).to_numpy()
    p = f"radius:{int(r)}_stat:"
    metrics = ["volume_chull", "area_chull", "n_chull", "distance_center_chull", "density_chull"]
    for key, same in [("all", None)] + [(f"cluster:{c}", c) for c in "012"]:
        ref = _brute_chull(x, labels, r, 5, 2, same)
        assert row[f"{p}chull_{key}_n_obs_chull"] == ref.shape[0]
        assert ref.shape[0] > 0
        for j, m in enumerate(metrics):
            np.testing.assert_allclose(row[f"{p}chull_{key}_{m}_mean"], ref[:, j].mean(), rtol=1e-9)
            np.testing.assert_allclose(row[f"{p}chull_{key}_{m}_sd"], ref[:, j].std(ddof=0), rtol=1e-7, atol=1e-9)
    deg = _dense_adjacency(x, r).sum(axis=1)
    np.testing.assert_allclose(row[f"{p}connectivity_mean"], deg.mean())
    np.testing.assert_allclose(row[f"{p}connectivity_std"], deg.std(ddof=0))
    for c in "012":
        np.testing.assert_allclose(row[f"{p}connectivity_degree_{c}_mean"], deg[labels == c].mean())
        np.testing.assert_allclose(row[f"{p}connectivity_degree_{c}_std"], deg[labels == c].std(ddof=0))


def test_kcore_is_order_independent():
    adata = one_sample(200, n_clusters=2, side=50.0, seed=11)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    a = sample_spatial_stats(adata, radii=(8,), stats="chull", chull_min_degree=4, chull_min_nds=5)
    b = sample_spatial_stats(adata[perm].copy(), radii=(8,), stats="chull", chull_min_degree=4, chull_min_nds=5)
    feats = [c for c in a.columns if is_feature_column(c)]
    np.testing.assert_allclose(a[feats].to_numpy(float), b[feats].to_numpy(float), rtol=1e-9, equal_nan=True)


def test_enrichment_moments_match_exhaustive_enumeration():
    rng = np.random.default_rng(5)
    n = 8
    adj = np.triu(rng.random((n, n)) < 0.45, 1)
    adj = adj | adj.T
    sizes = np.array([3, 3, 2])
    base = np.repeat(np.arange(3), sizes)
    results = []
    for perm in set(itertools.permutations(base)):
        lab = np.array(perm)
        onehot = np.eye(3)[lab]
        results.append(onehot.T @ adj.astype(float) @ onehot)
    results = np.array(results)
    deg = adj.sum(axis=1)
    mean, var = enrichment_moments(sizes, float(deg.sum()), float((deg * (deg - 1)).sum()))
    np.testing.assert_allclose(mean, results.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, results.var(axis=0), rtol=1e-10, atol=1e-12)


def test_absent_cluster_is_nan_and_counted():
    adata = one_sample(300, n_clusters=3, seed=2)
    row = sample_spatial_stats(adata, radii=(15,), categories=["0", "1", "2", "9"]).iloc[0]
    p = "radius:15_stat:"
    assert row[f"{p}counts_n_9"] == 0
    assert row[f"{p}counts_n_0"] == (adata.obs["leiden"] == "0").sum()
    for name in [f"{p}interactions_interaction_9_0", f"{p}interactions_interaction_0_9",
                 f"{p}interactions_enrichment_zscore_9_9", f"{p}centrality_9_degree_centrality",
                 f"{p}connectivity_degree_9_mean", f"{p}moran_clusters_moranI_9", f"{p}chull_cluster:9_n_obs_chull"]:
        assert np.isnan(row[name]), name
    assert row[f"{p}interactions_interaction_0_1"] > 0
    assert row["status"] == "ok" and row["n_obs"] == 300


def test_naming_and_subset_selection():
    adata = one_sample(200, seed=1)
    row = sample_spatial_stats(adata, radii=(25, 12.5), stats=["interactions", "connectivity"])
    feats = [c for c in row.columns if is_feature_column(c)]
    assert feats == feature_names((12.5, 25.0), ("interactions", "connectivity"), ["0", "1", "2", "3"])
    assert "radius:25_stat:interactions_interaction_norm_0_1" in feats
    assert "radius:12.5_stat:connectivity_degree_3_std" in feats
    assert not any("moran" in c or "chull" in c or "centrality" in c for c in feats)
    full = feature_names((25,), VALID_STATS, ["0", "1"], ["phc_latent_7"])
    assert "radius:25_stat:moran_features_moranI_phc_latent_7" in full
    assert "radius:25_stat:chull_cluster:1_volume_chull_mean" in full
    assert "radius:25_stat:chull_all_n_obs_chull" in full


def test_errors_are_clear():
    adata = one_sample(100, seed=1)
    with pytest.raises(ValueError, match="unknown entries.*'bogus'"):
        sample_spatial_stats(adata, stats=["interactions", "bogus"])
    with pytest.raises(KeyError, match="cluster_key='nope'"):
        sample_spatial_stats(adata, cluster_key="nope")
    with pytest.raises(KeyError, match="spatial_key='xyz'"):
        sample_spatial_stats(adata, spatial_key="xyz")
    bad = adata.copy()
    bad.obs["leiden"] = bad.obs["leiden"].astype(str)
    with pytest.raises(TypeError, match="must be categorical"):
        sample_spatial_stats(bad)
    with pytest.raises(ValueError, match="chull_min_nds"):
        sample_spatial_stats(adata, chull_min_nds=2)
    with pytest.raises(ValueError, match="radii"):
        sample_spatial_stats(adata, radii=(0,))


def test_one_cluster_and_empty_are_skipped_by_name():
    adata = one_sample(50, seed=1)
    adata.obs["leiden"] = pd.Categorical(["0"] * 50, categories=["0", "1"])
    with pytest.warns(SpatialStatsWarning, match="'w1'.*only one cluster"):
        row = sample_spatial_stats(adata, radii=(10,), name="w1")
    assert row.loc["w1", "status"] == "skipped" and "one cluster" in row.loc["w1", "skipped_reason"]
    assert np.isnan(row[[c for c in row.columns if is_feature_column(c)]].to_numpy(float)).all()
    with pytest.warns(SpatialStatsWarning, match="no labelled objects"):
        sample_spatial_stats(adata[:0].copy(), radii=(10,), name="empty")


def test_sampled_clustering_estimator_is_seeded_and_close_to_exact():
    adata = one_sample(3000, n_clusters=2, side=140.0, seed=4)
    kw = dict(radii=(15,), stats="centrality", n_clustering_samples=300)
    a = sample_spatial_stats(adata, seed=1, **kw).iloc[0]
    b = sample_spatial_stats(adata, seed=1, **kw).iloc[0]
    exact = sample_spatial_stats(adata, exact=True, **kw).iloc[0]
    for c in "01":
        name = f"radius:15_stat:centrality_{c}_average_clustering"
        se = a[f"radius:15_se:centrality_{c}_average_clustering"]
        assert a[name] == b[name]
        assert 0 < se < 0.02
        assert abs(a[name] - exact[name]) < 5 * se
        assert exact[f"radius:15_se:centrality_{c}_average_clustering"] == 0
        # degree and closeness do not depend on the sample
        for m in ("degree_centrality", "closeness_centrality"):
            assert a[f"radius:15_stat:centrality_{c}_{m}"] == exact[f"radius:15_stat:centrality_{c}_{m}"]


def test_2d_and_3d_and_unlabelled_objects():
    for dims in (2, 3):
        adata = one_sample(150, dims=dims, seed=dims)
        adata.obs.loc[adata.obs_names[:10], "leiden"] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            row = sample_spatial_stats(adata, radii=(20,)).iloc[0]
        assert row["n_unlabelled"] == 10 and row["n_obs"] == 140
        assert row["radius:20_stat:counts_total_objects"] == 140


def test_hulls_of_2d_data_stored_with_a_constant_z():
    flat = one_sample(260, n_clusters=3, dims=2, side=40.0, seed=2)
    padded = flat.copy()
    padded.obsm["spatial"] = np.c_[flat.obsm["spatial"], np.full(flat.n_obs, 7.0)]
    kw = dict(radii=(5,), stats="chull", chull_min_nds=5, chull_min_degree=2)
    a = sample_spatial_stats(flat, **kw)
    b = sample_spatial_stats(padded, **kw)
    assert a["radius:5_stat:chull_all_n_obs_chull"].iloc[0] > 0
    pd.testing.assert_frame_equal(a, b)
