"""Behaviour kept for users of the earlier ``phenocoder`` library (docs/migration.md), and a quiet write."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from phenocoder_lib.ingest import read_plate, write_sdata

REPO = Path(__file__).resolve().parents[2]


def test_write_sdata_does_not_warn_about_zarr_autosharding(tmp_path, synthetic_plate_2d):
    sdata = read_plate(synthetic_plate_2d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_sdata(sdata, tmp_path / "plate.zarr")
    assert not [w for w in caught if "autosharding" in str(w.message)], [str(w.message) for w in caught]


def test_conditions_none_builds_a_plain_cvae(tmp_path, synthetic_plate_2d):
    from phenocoder_lib import Phenocoder

    p = Phenocoder(sdata=read_plate(synthetic_plate_2d), seed=0)
    p.generate_dataset("d", tmp_path, patch_size=(16, 16), n_patches=40, progress=False)
    channels = len(p.open_datasets()[0].settings["channels"])
    p.initialize_model(4, 8, None, input_shape=(16, 16, channels), conv_layers=(8, 16), batch_size=16)
    assert type(p.model).__name__ == "CVAE"
    assert p.model_config["conditions"] == [] and p.model_config["model_class"] == "CVAE"
    with pytest.raises(TypeError, match=r"conditions='dataset' must be a list of column names; pass \[\]"):
        p.initialize_model(4, 8, "dataset", input_shape=(16, 16, channels), conv_layers=(8, 16))


def test_readme_and_code_name_the_centrality_columns_alike():
    from phenocoder_lib.spatial.stats import feature_names

    names = feature_names([25], ["centrality"], ["0"])
    assert "radius:25_stat:centrality_0_degree_centrality" in names
    readme = (REPO / "README.md").read_text()
    assert "`radius:{r}_stat:centrality_{cluster}_{metric}`" in readme
    migration = (REPO / "docs" / "migration.md").read_text()
    recipe = re.search(r'c\.replace\("(_stat:centrality_centrality_)", "(_stat:centrality_)"\)', migration)
    assert recipe is not None
    old = names[-1].replace(recipe.group(2), recipe.group(1))
    assert old == "radius:25_stat:centrality_centrality_0_closeness_centrality"
    assert old.replace(recipe.group(1), recipe.group(2)) == names[-1]
