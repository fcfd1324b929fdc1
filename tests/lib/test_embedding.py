"""Sample embedding: idempotent, NaN handling, batch correction, small-n UMAP, subunit obs mapping."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.embedding import map_sample_obs, ridge_batch_correction, spatialgraph_embedding
from phenocoder_lib.spatial import EmbeddingWarning, SpatialStatsWarning
from phenocoder_lib.spatial.driver import compute_spatial_stats

try:  # tests/lib may or may not be a package
    from .spatial_fixtures import make_table
except ImportError:
    from spatial_fixtures import make_table


def test_ridge_removes_batch_and_keeps_confounder():
    rng = np.random.default_rng(0)
    n = 400
    batch = rng.choice(["b1", "b2"], n)
    treat = rng.choice(["ctrl", "drug"], n)
    x = rng.normal(scale=0.1, size=(n, 3))
    x[:, 0] += np.where(batch == "b2", 5.0, 0.0)
    x[:, 1] += np.where(treat == "drug", 3.0, 0.0)
    obs = pd.DataFrame({"batch": batch, "treat": treat})
    out = ridge_batch_correction(x, obs, ["batch"], ["treat"])
    gap = lambda col, key, a, b: out[obs[key] == a, col].mean() - out[obs[key] == b, col].mean()  # noqa: E731
    assert abs(gap(0, "batch", "b2", "b1")) < 0.1
    assert abs(gap(1, "treat", "drug", "ctrl") - 3.0) < 0.1


def test_map_sample_obs_by_column_or_index():
    src = pd.DataFrame({"sample": [1, 1, 2, 2], "plate": ["p", "p", "q", "q"], "z": [0, 1, 0, 0]})
    import anndata as ad

    sub = ad.AnnData(np.zeros((3, 1)), obs=pd.DataFrame({"sample": ["2", "1", "2"]}, index=["0", "1", "2"]))
    assert map_sample_obs(sub, src, "sample", ["plate"])["plate"].tolist() == ["q", "p", "q"]
    smp = ad.AnnData(np.zeros((2, 1)), obs=pd.DataFrame(index=["1", "2"]))
    assert map_sample_obs(smp, src, "sample", ["plate"])["plate"].tolist() == ["p", "q"]
    with pytest.raises(ValueError, match="not constant within samples"):
        map_sample_obs(smp, src, "sample", ["z"])
    with pytest.raises(KeyError, match="'nope'"):
        map_sample_obs(smp, src, "sample", ["nope"])


@pytest.fixture(scope="module")
def stats_3_wells():
    table = make_table(900, n_samples=3, seed=12)
    table.obs["plate"] = table.obs["sample"].map({"S0": "p1", "S1": "p1", "S2": "p2"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialStatsWarning)
        res = compute_spatial_stats(table, sample_key="sample", radii=(25,), progress=False,
                                    stats=["interactions", "connectivity", "moran_clusters"])
    return table, res


@pytest.mark.slow  # scanpy neighbours/UMAP import umap and pynndescent (tens of seconds of numba compilation)
def test_three_wells_idempotent_with_umap_fallback(stats_3_wells, tmp_path):
    table, res = stats_3_wells
    with pytest.warns(EmbeddingWarning, match="spectral"):
        emb = spatialgraph_embedding(res, 32, obs_keys="plate", source_obs=table.obs)
    assert emb.obsm["X_umap"].shape == (3, 2) and np.isfinite(emb.obsm["X_umap"]).all()
    assert emb.obsm["X_pca"].shape == (3, 2)  # n_dim bounded by n_obs - 1
    np.testing.assert_array_equal(emb.layers["raw"], res.X)
    assert emb.uns["spatialgraph_embedding"]["umap_init"] != "spectral"
    assert list(emb.obs["plate"]) == ["p1", "p1", "p2"]
    assert "X_pca" not in res.obsm and "raw" not in res.layers  # input untouched
    # scaled: NaN (absent cluster '4') imputed with the mean, i.e. 0 after scaling
    col = list(res.var_names).index("radius:25_stat:interactions_interaction_4_0")
    assert np.isnan(res.X[:, col]).all() and (emb.X[:, col] == 0).all()
    with pytest.warns(EmbeddingWarning):
        again = spatialgraph_embedding(emb, 32, obs_keys="plate", source_obs=table.obs)
    np.testing.assert_array_equal(again.X, emb.X)
    np.testing.assert_array_equal(again.layers["raw"], res.X)
    np.testing.assert_allclose(again.obsm["X_umap"], emb.obsm["X_umap"])
    emb.write_h5ad(tmp_path / "embedding.h5ad")  # serialisable as is


@pytest.mark.slow
def test_batch_correction_variable_features_and_skipped_rows():
    table = make_table(3000, n_samples=12, side=150.0, seed=13)
    table.obs["plate"] = table.obs["sample"].map(lambda s: "p1" if int(s[1:]) % 2 else "p2")
    table.obs.loc[table.obs["sample"] == "S5", "leiden"] = "1"  # one skipped well
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialStatsWarning)
        res = compute_spatial_stats(table, sample_key="sample", radii=(25,), progress=False,
                                    stats=["interactions", "connectivity"])
    with pytest.raises(ValueError, match="batch_key"):
        spatialgraph_embedding(res, 4, batch_correction=True)
    emb = spatialgraph_embedding(res, 4, batch_correction=True, batch_key="plate", variable_features=10,
                                 source_obs=table.obs, n_neighbors=5)
    assert emb.var["highly_variable"].sum() == 10
    skipped = emb.obs["status"] == "skipped"
    assert skipped.sum() == 1
    assert np.isnan(emb.obsm["X_umap"][skipped.to_numpy()]).all()
    assert np.isfinite(emb.obsm["X_umap"][~skipped.to_numpy()]).all()
    assert emb.obsp["connectivities"][np.flatnonzero(skipped)[0]].nnz == 0
    # the neighbour method is the explicit default, whatever is installed
    assert emb.uns["spatialgraph_embedding"]["neighbors"] == "scanpy"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_dim": 2.5}, ValueError, r"n_dim=2\.5 must be an int >= 1\. Pass the number"),
        ({"n_dim": 0}, ValueError, r"n_dim=0 must be an int >= 1"),
        ({"n_dim": "3"}, TypeError, r"n_dim='3' must be an int >= 1, found str"),
        ({"n_neighbors": 1}, ValueError, r"n_neighbors=1 must be an int >= 2"),
        ({"variable_features": 0}, ValueError, r"variable_features=0 must be an int >= 1"),
        ({"variable_features": "top"}, TypeError, r"variable_features='top' must be True, False or an int"),
        ({"scale": "yes"}, TypeError, r"scale='yes' must be True or False"),
        ({"neighbors": "faiss"}, ValueError, r"neighbors='faiss' is not valid; choose one of \['scanpy', 'bbknn'\]"),
        ({"neighbors": "bbknn"}, ValueError, r"neighbors='bbknn' balances the graph .* batch_correction=True"),
    ],
)
def test_invalid_options_raise_before_any_work(stats_3_wells, kwargs, error, match):
    _, res = stats_3_wells
    args = {"n_dim": 2, **kwargs}
    with pytest.raises(error, match=match):
        spatialgraph_embedding(res, args.pop("n_dim"), **args)
    assert "X_pca" not in res.obsm  # input untouched


def test_bbknn_is_opt_in_and_names_the_extra_when_missing(stats_3_wells, monkeypatch):
    import sys

    table, res = stats_3_wells
    monkeypatch.setitem(sys.modules, "bbknn", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'phenocoder\[bbknn\]'"):
        spatialgraph_embedding(res, 2, batch_correction=True, batch_key="plate", source_obs=table.obs,
                               neighbors="bbknn")


def test_warm_up_compiles_the_umap_kernels_without_a_warning():
    """The demo runs ``warm_up`` in a background thread: it must not touch the warnings filters (not thread
    safe) and must not emit anything the user would see; afterwards UMAP's layout kernel is compiled."""
    import umap.layouts

    from phenocoder_lib.embedding import MIN_SPECTRAL_OBS, warm_up

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seconds = warm_up()
    assert seconds > 0
    assert len(umap.layouts._nb_optimize_layout_euclidean_single_epoch.signatures) >= 1
    with pytest.raises(ValueError, match="n_rows"):
        warm_up(n_rows=MIN_SPECTRAL_OBS - 1)


def test_warm_up_kernels_runs_every_later_stage_on_a_small_well_without_a_warning():
    """``phenocoder demo`` runs this in a thread while the model trains: every part runs, nothing warns."""
    from phenocoder_lib.pipeline import kernels_cached, warm_up_kernels

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seconds = warm_up_kernels(n_objects=120)
    assert set(seconds) == {"message_passing", "graph_stats", "embedding"}
    assert all(v >= 0 for v in seconds.values())
    with pytest.raises(ValueError, match="n_objects"):
        warm_up_kernels(n_objects=10)
    assert kernels_cached()  # every kernel it checks is one the warm-up compiled (and numba cached)


def test_kernels_cached_is_false_with_an_empty_numba_cache(tmp_path):
    """The demo compiles the kernels in a child process when this says False (first run after installation)."""
    import os
    import subprocess
    import sys

    code = "from phenocoder_lib.pipeline import kernels_cached; print(kernels_cached())"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
