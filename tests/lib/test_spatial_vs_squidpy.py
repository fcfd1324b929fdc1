"""Our statistics against squidpy (and networkx through it) on small random graphs."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import squidpy as sq

from phenocoder_lib.spatial.stats import sample_spatial_stats

try:  # tests/lib may or may not be a package
    from .spatial_fixtures import one_sample
except ImportError:
    from spatial_fixtures import one_sample

RADIUS = 14.0
CATS = ["0", "1", "2", "3"]


@pytest.fixture(scope="module")
def case():
    adata = one_sample(350, n_clusters=4, dims=3, side=100.0, seed=7)
    row = sample_spatial_stats(adata, radii=(RADIUS,), exact=True, name="s")
    ref = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sq.gr.spatial_neighbors(ref, coord_type="generic", radius=RADIUS, delaunay=False)
    return adata, row.iloc[0], ref


def _mat(row, col):
    return np.array([[row[f"radius:14_stat:interactions_{col}_{a}_{b}"] for b in CATS] for a in CATS], dtype=float)


def _vec(row, fmt, keys):
    return np.array([row[fmt.format(k)] for k in keys], dtype=float)


def test_graph_identical_to_squidpy(case):
    from phenocoder_lib.spatial.graph import build_radius_graph

    adata, _, ref = case
    ours = build_radius_graph(adata.obsm["spatial"], RADIUS).to_csr(RADIUS)
    theirs = ref.obsp["spatial_connectivities"].tocsr()
    assert (ours != (theirs > 0)).nnz == 0


def test_interaction_matrix(case):
    _, row, ref = case
    counts = sq.gr.interaction_matrix(ref, "leiden", copy=True)
    norm = sq.gr.interaction_matrix(ref, "leiden", normalized=True, copy=True)
    np.testing.assert_array_equal(_mat(row, "interaction"), counts)
    np.testing.assert_allclose(_mat(row, "interaction_norm"), norm, rtol=1e-12)


def test_group_centralities_exact(case):
    _, row, ref = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = sq.gr.centrality_scores(ref, "leiden", copy=True, show_progress_bar=False)
    for metric in ("degree_centrality", "average_clustering", "closeness_centrality"):
        ours = _vec(row, "radius:14_stat:centrality_{}_" + metric, CATS)
        np.testing.assert_allclose(ours, scores.loc[CATS, metric].to_numpy(dtype=float), rtol=1e-12, atol=1e-14,
                                   err_msg=metric)


def test_moran_features_and_clusters(case):
    adata, row, ref = case
    genes = list(adata.var_names)
    res = sq.gr.spatial_autocorr(ref, mode="moran", genes=genes, n_perms=None, copy=True)
    np.testing.assert_allclose(_vec(row, "radius:14_stat:moran_features_moranI_{}", genes),
                               res.loc[genes, "I"].to_numpy(), rtol=1e-6, atol=1e-8)
    import anndata as ad

    onehot = ad.AnnData(pd.get_dummies(ref.obs["leiden"]).astype(float).to_numpy(), obs=ref.obs.copy())
    onehot.var_names = [str(c) for c in ref.obs["leiden"].cat.categories]
    onehot.obsp["spatial_connectivities"] = ref.obsp["spatial_connectivities"]
    res = sq.gr.spatial_autocorr(onehot, mode="moran", genes=CATS, n_perms=None, copy=True)
    np.testing.assert_allclose(_vec(row, "radius:14_stat:moran_clusters_moranI_{}", CATS),
                               res.loc[CATS, "I"].to_numpy(), rtol=1e-6, atol=1e-8)


def test_enrichment_zscores_within_monte_carlo_noise(case):
    _, row, ref = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z, counts = sq.gr.nhood_enrichment(ref, "leiden", copy=True, n_perms=1000, seed=0,
                                           show_progress_bar=False)
    ours = _mat(row, "enrichment_zscore")
    np.testing.assert_array_equal(_mat(row, "interaction"), counts)
    # the SD of a 1000-permutation z-score estimate is ~2-3 %; allow 5 sigma
    np.testing.assert_allclose(ours, z, rtol=0.12, atol=0.12)
    assert np.corrcoef(ours.ravel(), z.ravel())[0, 1] > 0.99
