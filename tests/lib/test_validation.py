"""The input checks of phenocoder_lib.validation: each names the argument, the value found and the fix."""

from __future__ import annotations

from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.validation import (
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_subset,
    check_type,
    literal_values,
)

Mode = Literal["fast", "exact"]


def test_check_choice_takes_the_literal_type_itself():
    assert literal_values(Mode) == ("fast", "exact")
    assert check_choice("exact", Mode, argument="mode") == "exact"
    with pytest.raises(ValueError, match=r"mode='slow' is not valid; choose one of \['fast', 'exact'\]"):
        check_choice("slow", Mode, argument="mode")
    with pytest.raises(ValueError, match=r"mode=\['fast'\] is not valid"):  # unhashable: not a choice, no TypeError
        check_choice(["fast"], {"fast", "exact"}, argument="mode")
    with pytest.raises(ValueError, match=r"modes has unknown entries \['slow'\]; valid entries: \['fast', 'exact'\]"):
        check_subset(["fast", "slow"], Mode, argument="modes")


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (2.5, ValueError, r"n=2\.5 must be an int >= 1\."),
        (3.0, ValueError, r"n=3\.0 must be an int >= 1\."),  # a float is not an int, even a whole one
        (0, ValueError, r"n=0 must be an int >= 1\."),
        (True, TypeError, r"n=True must be an int >= 1, found bool"),
        ("4", TypeError, r"n='4' must be an int >= 1, found str"),
        (None, TypeError, r"n=None must be an int >= 1, found NoneType"),
    ],
)
def test_check_int_rejects_what_is_not_an_int(value, error, match):
    with pytest.raises(error, match=match):
        check_int(value, argument="n", minimum=1)


def test_check_int_accepts_numpy_integers_and_words_the_expectation():
    assert check_int(np.int64(7), argument="n", minimum=1) == 7 and type(check_int(np.int32(2), argument="n")) is int
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive int\. Try 512\."):
        check_int(0, argument="batch_size", minimum=1, expected="a positive int", fix="Try 512.")


def test_check_positive_names_the_unit():
    assert check_positive(0, argument="r", allow_zero=True) == 0.0
    with pytest.raises(ValueError, match=r"r=0 must be > 0 \(a finite number in um\)"):
        check_positive(0, argument="r", unit="um")
    with pytest.raises(ValueError, match=r"r=nan must be >= 0"):
        check_positive(float("nan"), argument="r", allow_zero=True)
    with pytest.raises(TypeError, match=r"r='5' must be > 0 \(a finite number\), found str"):
        check_positive("5", argument="r")


def test_check_bool_and_check_type():
    assert check_bool(np.True_, argument="scale") is True
    with pytest.raises(TypeError, match=r"scale='no' must be True or False, found str"):
        check_bool("no", argument="scale")
    with pytest.raises(TypeError, match=r"keys=3 must be a str or a list of str, found int\. Pass \['a'\]\."):
        check_type(3, (str, list), argument="keys", expected="a str or a list of str", fix="Pass ['a'].")


def test_check_spatial_stats_args_is_the_check_of_compute_spatial_stats():
    from phenocoder_lib.spatial.driver import check_spatial_stats_args

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"sample": ["a"] * 5 + ["b"] * 5,
                        "leiden": pd.Categorical(list("0101001101"))}, index=[f"c{i}" for i in range(10)])
    table = ad.AnnData(np.zeros((10, 1), np.float32), obs=obs)
    table.obsm["spatial"] = rng.uniform(0, 10, (10, 2))
    assert check_spatial_stats_args(table, sample_key="sample", radii=(5,), progress=False, seed=3) is None
    cases = [
        ({"sample_key": "well"}, KeyError, r"sample_key='well' is not a column of \.obs"),
        ({"n_jobs": 0}, ValueError, r"n_jobs=0 must be an int >= 1"),
        ({"n_clustering_samples": 1}, ValueError, r"n_clustering_samples=1 must be an int >= 2\. The standard error"),
        ({"chull_min_nds": 2}, ValueError, r"chull_min_nds=2 must be an int >= 3\. A convex hull in 2-D"),
        ({"use_subunits": True, "min_obs_per_subunit": 0}, ValueError, r"min_obs_per_subunit=0 must be an int >= 1"),
        ({"use_subunits": True, "max_obs_per_subunit": 0}, ValueError,
         r"max_obs_per_subunit=0 must be None or a positive int"),
        ({"max_clusters": 1}, ValueError, r"more than max_clusters=1"),
        ({"stats": "bogus"}, ValueError, r"stats has unknown entries \['bogus'\]"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            check_spatial_stats_args(table, **{"sample_key": "sample", **kwargs})
    with pytest.raises(TypeError, match=r"found unknown \['radius'\]"):
        check_spatial_stats_args(table, sample_key="sample", radius=5)
    table.obs.loc["c0", "sample"] = None
    with pytest.raises(ValueError, match=r"sample_key='sample': 1 objects have no value \(NaN\)"):
        check_spatial_stats_args(table, sample_key="sample")
