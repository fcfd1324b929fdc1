"""Table driver and the Phenocoder facade: layout, skips, subunits, determinism, no mutation."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import Phenocoder
from phenocoder_lib.spatial import SpatialStatsWarning
from phenocoder_lib.spatial.driver import compute_spatial_stats
from phenocoder_lib.spatial.stats import is_feature_column, sample_spatial_stats
from phenocoder_lib.spatial.subunits import partition_subunits, subunit_indices

try:  # tests/lib may or may not be a package
    from .spatial_fixtures import make_table
except ImportError:
    from spatial_fixtures import make_table


def make_host(sdata, table_key="t", sample_key="sample", seed=0) -> Phenocoder:
    """A ``Phenocoder`` over a stand-in for SpatialData: the spatial steps read only ``sdata.tables``."""
    pheno = Phenocoder(table_key=table_key, sample_key=sample_key, seed=seed)
    pheno.sdata = sdata
    return pheno


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialStatsWarning)
        return fn(*args, **kwargs)


def test_sample_level_layout_matches_per_sample_function():
    table = make_table(900, n_samples=3, seed=1)
    res = compute_spatial_stats(table, sample_key="sample", radii=(20, 30), progress=False)
    assert list(res.obs_names) == ["S0", "S1", "S2"] and res.obs.index.name == "sample"
    assert (res.obs["status"] == "ok").all() and res.X.dtype == np.float64
    assert res.var_names[0] == "radius:20_stat:counts_total_objects"
    assert set(res.var["group"]) == {"counts", "interactions", "centrality", "connectivity", "moran_features",
                                     "moran_clusters", "chull"}
    # the unused global category '4' still has its columns, all NaN
    assert np.isnan(res[:, "radius:20_stat:centrality_4_degree_centrality"].X).all()
    assert (res[:, "radius:20_stat:counts_n_4"].X == 0).all()
    one = table[table.obs["sample"] == "S1"].copy()
    row = sample_spatial_stats(one, radii=(20, 30), categories=list(table.obs["leiden"].cat.categories), name="S1")
    feats = [c for c in row.columns if is_feature_column(c)]
    assert feats == list(res.var_names)
    np.testing.assert_array_equal(row[feats].to_numpy(float)[0], res["S1"].X[0])
    assert res.uns["spatialgraph_stats"]["categories"] == ["0", "1", "2", "3", "4"]


def test_source_table_is_not_modified_and_run_is_deterministic():
    table = make_table(600, seed=2)
    table.uns["arr"] = np.array(["a", "b"], dtype=np.dtypes.StringDType())
    before_obs = table.obs.copy()
    before_uns = copy.deepcopy(table.uns)
    a = compute_spatial_stats(table, sample_key="sample", radii=25, progress=False, n_clustering_samples=20)
    b = compute_spatial_stats(table, sample_key="sample", radii=25, progress=False, n_clustering_samples=20)
    np.testing.assert_array_equal(a.X, b.X)
    pd.testing.assert_frame_equal(table.obs, before_obs)
    assert table.uns["arr"].dtype == before_uns["arr"].dtype
    c = compute_spatial_stats(table, sample_key="sample", radii=25, progress=False, n_clustering_samples=20, seed=5)
    assert not np.array_equal(np.nan_to_num(a.X), np.nan_to_num(c.X))  # the seed reaches the estimator


def test_int_sample_ids_and_skipped_and_empty_samples():
    table = make_table(500, sample_ids=[3, 11, 7], seed=3)
    table.obs.loc[table.obs["sample"] == 11, "leiden"] = "2"
    table.obs["sample"] = pd.Categorical(table.obs["sample"], categories=[3, 7, 11, 99])
    with pytest.warns(SpatialStatsWarning) as rec:
        res = compute_spatial_stats(table, sample_key="sample", radii=25, progress=False)
    msg = str(rec[0].message)
    assert "'11'" in msg and "'99'" in msg
    assert list(res.obs_names) == ["3", "7", "11", "99"]
    assert res.obs.loc["11", "status"] == "skipped" and "one cluster" in res.obs.loc["11", "skipped_reason"]
    assert res.obs.loc["99", "skipped_reason"] == "no labelled objects"
    assert np.isnan(res["99"].X).all() and res.obs.loc["3", "status"] == "ok"


def test_nothing_computable_raises_and_clears_stale_result():
    table = make_table(200, seed=4)
    table.obs["leiden"] = pd.Categorical(["1"] * 200, categories=["0", "1"])
    host = make_host(SimpleNamespace(tables={"t": table}))
    host.adata = "stale"
    with pytest.raises(ValueError, match="no spatial statistics could be computed"):
        _quiet(host.spatialgraph_stats, radii=(25,), progress=False)
    assert host.adata is None
    host.adata = "kept"
    with pytest.raises(ValueError, match="unknown entries"):  # argument errors leave state alone
        host.spatialgraph_stats(stats=["nope"], progress=False)
    assert host.adata == "kept"


def test_verbose_is_deprecated_and_names_the_replacement():
    table = make_table(300, seed=4)
    host = make_host(SimpleNamespace(tables={"t": table}))
    with pytest.warns(FutureWarning, match="set_verbose_logging"):
        _quiet(host.spatialgraph_stats, radii=(25,), stats=["interactions"], progress=False, verbose=True)
    assert host.adata is not None and host.adata.n_obs == table.obs["sample"].nunique()


def test_facade_errors_name_the_argument():
    table = make_table(200, seed=4)
    host = make_host(SimpleNamespace(tables={"t": table}))
    with pytest.raises(KeyError, match="table_key='missing'"):
        host.spatialgraph_stats(table_key="missing")
    with pytest.raises(KeyError, match="cluster_key='x'"):
        host.spatialgraph_stats(cluster_key="x")
    with pytest.raises(KeyError, match="spatial_key='xy'"):
        host.spatialgraph_stats(spatial_key="xy")
    host.sample_key = "well"
    with pytest.raises(KeyError, match="sample_key='well'"):
        host.spatialgraph_stats()
    with pytest.raises(ValueError, match="add_sdata"):
        make_host(None).spatialgraph_stats()
    with pytest.raises(ValueError, match="spatialgraph_stats"):
        make_host(None).spatialgraph_embedding(2)


def test_subunits_share_the_grid_origin_across_samples():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (50, 3))
    b = a + np.array([7.0, 0, 0])  # a shifted well: a per-sample origin would give the same keys
    ka = {tuple(k) for k in subunit_indices(a, (40, 40, 40))}
    kb = {tuple(k) for k in subunit_indices(b, (40, 40, 40))}
    assert ka != kb
    ia = subunit_indices(a, 40)
    np.testing.assert_array_equal(ia, np.floor(a / 40).astype(int))
    np.testing.assert_array_equal(subunit_indices(a[:, :2], (40, 40, 100)), np.floor(a[:, :2] / 40))
    subs, n_small = partition_subunits(a, 50, min_obs=5, max_obs=4, seed=1, seed_key=(9,))
    subs2, _ = partition_subunits(a, 50, min_obs=5, max_obs=4, seed=1, seed_key=(9,))
    assert [s.rows.tolist() for s in subs] == [s.rows.tolist() for s in subs2]
    assert all(s.rows.shape[0] == 4 and s.n_total >= 5 for s in subs)
    assert n_small + len(subs) == len({tuple(k) for k in subunit_indices(a, 50)})


def test_subunit_level_table():
    table = make_table(1500, n_samples=2, side=200.0, seed=5)
    kw = dict(sample_key="sample", radii=25, use_subunits=True, dim_subunit=(100, 100, 200),
              min_obs_per_subunit=60, max_obs_per_subunit=150, progress=False, stats=["interactions", "chull"])
    res = _quiet(compute_spatial_stats, table, **kw)
    obs = res.obs
    assert list(obs.columns[:6]) == ["sample", "subunit_id", "subunit_key", "subunit_n_obs", "subunit_n_total",
                                     "status"]
    assert list(res.obs_names) == [str(i) for i in range(res.n_obs)]
    assert obs["subunit_id"].dtype == np.int64 and (obs["subunit_n_obs"] <= 150).all()
    keys = obs.groupby("sample")["subunit_key"].apply(set)
    assert keys["S0"] == keys["S1"] == {"(0, 0, 0)", "(0, 1, 0)", "(1, 0, 0)", "(1, 1, 0)"}
    res2 = _quiet(compute_spatial_stats, table, **kw)
    np.testing.assert_array_equal(res.X, res2.X)


def test_subunits_without_any_kept_cube_are_reported():
    table = make_table(400, n_samples=2, seed=6)
    with pytest.raises(ValueError, match="all 2 subunits were skipped.*'S0': no subunit with >= 500 objects"):
        compute_spatial_stats(table, sample_key="sample", radii=25, use_subunits=True, min_obs_per_subunit=500,
                                  progress=False)


@pytest.mark.slow  # spawns worker processes (imports + numba cache loading per worker)
def test_worker_processes_give_the_same_table():
    table = make_table(1200, n_samples=4, seed=9)
    kw = dict(sample_key="sample", radii=(20, 30), progress=False, n_clustering_samples=50)
    one = compute_spatial_stats(table, n_jobs=1, **kw)
    two = compute_spatial_stats(table, n_jobs=2, **kw)
    np.testing.assert_array_equal(one.X, two.X)
    pd.testing.assert_frame_equal(one.obs, two.obs)
