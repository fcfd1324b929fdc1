"""The standalone spatial path on ingested plates: labels -> spatialgraph_stats (-> embedding)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import Phenocoder
from phenocoder_lib.spatial import EmbeddingWarning, SpatialStatsWarning


def make_host(sdata, table_key="nuclei_features", sample_key="sample", seed=0) -> Phenocoder:
    """A ``Phenocoder`` over a stand-in for SpatialData: the spatial steps read only ``sdata.tables``."""
    pheno = Phenocoder(table_key=table_key, sample_key=sample_key, seed=seed)
    pheno.sdata = sdata
    return pheno


def _truth_labels(root, table):
    from phenocoder_lib.synthetic import read_ground_truth

    objects, _ = read_ground_truth(root)
    truth = objects.set_index(["well", "label"])["cell_type"].astype(str)
    keys = pd.MultiIndex.from_arrays([table.obs["well"].astype(str), table.obs["instance_id"].astype(int)])
    return pd.Categorical(truth.reindex(keys).to_numpy())


def test_synthetic_plate_with_planted_labels(synthetic_plate_3d, tmp_path):
    from phenocoder_lib.ingest import read_plate

    sdata = read_plate(synthetic_plate_3d)
    table = sdata.tables["nuclei_features"]
    table.obs["cell_type"] = _truth_labels(synthetic_plate_3d, table)
    assert table.obs["cell_type"].notna().all()
    before = table.obs.copy()
    host = make_host(SimpleNamespace(tables=sdata.tables))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpatialStatsWarning)
        res = host.spatialgraph_stats(cluster_key="cell_type", radii=(25, 50), progress=False)
    assert list(res.obs_names) == sorted(table.obs["sample"].astype(str).unique())
    assert (res.obs["status"] == "ok").all()
    assert res.obs.index.name == "sample"
    pd.testing.assert_frame_equal(table.obs, before)  # the source table is untouched
    res.write_h5ad(tmp_path / "stats.h5ad")  # the result is serialisable as is


@pytest.mark.slow  # Leiden needs scanpy neighbours (umap/pynndescent import: tens of seconds)
def test_standalone_path_on_synthetic_and_real_plate(synthetic_plate_3d, request):
    from phenocoder_lib.clustering import cluster_features
    from phenocoder_lib.ingest import read_plate

    plates = [(read_plate(synthetic_plate_3d), (25, 50))]
    try:
        path, geometry = request.getfixturevalue("plate_3d_path"), request.getfixturevalue("plate_3d_geometry")
        plates.append((read_plate(path, **geometry), (25, 50)))
    except pytest.skip.Exception:
        pass
    for sdata, radii in plates:
        table = sdata.tables["nuclei_features"]
        labels, _ = cluster_features(table, resolution=0.5, n_pcs=10, seed=0)
        table.obs["leiden"] = labels
        host = make_host(SimpleNamespace(tables=sdata.tables))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpatialStatsWarning)
            res = host.spatialgraph_stats(cluster_key="leiden", radii=radii, progress=False)
        assert (res.obs["status"] == "ok").all()
        assert np.isfinite(res[:, [v for v in res.var_names if "counts_" in v]].X).all()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmbeddingWarning)
            emb = host.spatialgraph_embedding(8, obs_keys="plate")
        assert np.isfinite(emb.obsm["X_umap"]).all() and emb.n_obs == res.n_obs
