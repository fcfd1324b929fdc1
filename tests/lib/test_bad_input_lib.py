"""Bad input, a catalogue: every kind of bad input through the library, and what happens.

Each case either raises a built-in exception whose message names the argument (or file), the value
found and the fix -- the ``match`` regexes check those three parts -- or behaves gracefully in a
documented way that the test pins down (values, shapes, flags, warnings). Failed calls must not
touch earlier results: see the ``*_keeps_*`` tests. The Dagster side is in
``tests/assets/test_bad_input_assets.py``; the model-dependent cases are in ``test_bad_input_model.py``.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import Phenocoder
from phenocoder_lib.ingest import PlateLayout, read_plate, scan_plate
from phenocoder_lib.patches import ConstantChannelWarning, PatchDataset, generate_dataset, patch_windows
from phenocoder_lib.spatial import SpatialStatsWarning, spatial_message_passing
from phenocoder_lib.synthetic import make_synthetic_plate

try:  # tests/lib may or may not be a package
    from .spatial_fixtures import make_table
except ImportError:
    from spatial_fixtures import make_table

TABLE = "nuclei_features"


# --------------------------------------------------------------------------------------------------
# Tiny plates (built once per session, see conftest.py) and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plates(plate_template) -> dict[str, Path]:
    """Tiny exports (read-only): 2-D uint8 (2 wells), 3-D uint8 (1 well, 3 slices), 2-D uint16 (1 well)."""
    return {name: plate_template(kind, name) for name, kind in (("p2d", "tiny"), ("p3d", "tiny3d"), ("p16", "tiny16"))}


@pytest.fixture(scope="module")
def sd2(plates):
    return read_plate(plates["p2d"])


@pytest.fixture(scope="module")
def sd3(plates):
    return read_plate(plates["p3d"])


def _with(sdata, *, edit=None, images=None):
    """A new SpatialData with a copy of the table (``edit(table)`` applied) and the same or other images."""
    import spatialdata as sd

    table = sdata.tables[TABLE].copy()
    if edit is not None:
        edit(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "table annotates labels not present": labels dropped
        return sd.SpatialData(images=dict(sdata.images) if images is None else images, tables={TABLE: table})


def _gen(sdata, out: Path, **kwargs):
    args = dict(dataset="d", dir_dataset=out, table_key=TABLE, sample_key="sample", image_key="IF", patch_size=16)
    args.update(kwargs)
    return generate_dataset(sdata, **args)


def _set_obsm(key, fn):
    def edit(table):
        table.obsm[key] = fn(np.asarray(table.obsm["spatial_index"]))

    return edit


def _first_row(value):
    def fn(index):
        out = index.astype(float)
        out[0] = value
        return out

    return fn


def _dup_names(table):
    names = list(table.obs_names)
    names[1] = names[0]
    table.obs_names = names


def _no_sample(table):
    sample = table.obs["sample"].astype(object)
    sample.iloc[[2, 5]] = None
    table.obs["sample"] = sample


# --------------------------------------------------------------------------------------------------
# Wrong keys, shapes and types, geometry: generate_dataset (the facade's and the pure function's door)
# --------------------------------------------------------------------------------------------------

AVAILABLE = r"[^;]*; available: \[.*\]\. "
DATASET_ERRORS = [
    # wrong keys: argument=value, what is available, the fix
    (
        "table_key",
        {"table_key": "cells"},
        None,
        KeyError,
        r"table_key='cells' is not a table" + AVAILABLE + r"Pass the name of the per-object table",
    ),
    (
        "sample_key",
        {"sample_key": "well_id"},
        None,
        KeyError,
        r"sample_key='well_id' is not a column" + AVAILABLE + r"Pass one of the available columns",
    ),
    (
        "image_key",
        {"image_key": "DAPI"},
        None,
        KeyError,
        r"image key='DAPI_p2d_A01' is not an image"
        + AVAILABLE
        + r"Images must be stored as f'\{image_key\}_\{sample\}'",
    ),
    (
        "obsm_key",
        {"spatial_key_index": "xy"},
        None,
        KeyError,
        r"spatial_key_index='xy' is not a key" + AVAILABLE + r"Store coordinates in \.obsm first",
    ),
    (
        "metadata_key",
        {"metadata_keys": ["donor"]},
        None,
        KeyError,
        r"metadata_keys='donor' is not a column" + AVAILABLE + "Pass one of the available columns",
    ),
    # shapes and types
    (
        "obsm_1_column",
        {},
        _set_obsm("spatial_index", lambda i: i[:, :1]),
        ValueError,
        r"spatial_key_index='spatial_index'.*has 1 columns, expected one of \[2, 3\] \(y, x for 2-D",
    ),
    (
        "obsm_4_columns",
        {},
        _set_obsm("spatial_index", lambda i: np.c_[i, i]),
        ValueError,
        r"has 4 columns, expected one of \[2, 3\]",
    ),
    (
        "float_indices",
        {},
        _set_obsm("spatial_index", lambda i: i + 0.5),
        TypeError,
        r"spatial_key_index='spatial_index'.*dtype float64; integer pixel indices are needed.*np\.rint",
    ),
    (
        "string_indices",
        {},
        _set_obsm("spatial_index", lambda i: i.astype(str)),
        TypeError,
        r"must be numeric, found dtype <U",
    ),
    (
        "nan_indices",
        {},
        _set_obsm("spatial_index", _first_row(np.nan)),
        ValueError,
        r"spatial_key_index='spatial_index'.*1 rows with NaN or inf coordinates; drop or fix those objects",
    ),
    ("inf_indices", {}, _set_obsm("spatial_index", _first_row(np.inf)), ValueError, r"1 rows with NaN or inf"),
    (
        "z_column_on_2d_image",
        {},
        _set_obsm("spatial_index", lambda i: np.c_[i, np.ones(len(i), int)]),
        ValueError,
        r"spatial_key_index='spatial_index' has z values other than 0 but sample 'p2d_A01' has a 2-D image; "
        r"drop the z column",
    ),
    (
        "negative_indices",
        {},
        _set_obsm("spatial_index", lambda i: i - 200),
        ValueError,
        r"12 objects of sample 'p2d_A01' have y outside the image \(0\.\.63\), e\.g\. .* with y=\[-\d+.*"
        r"Check the table's scale",
    ),
    (
        "outside_the_image",
        {},
        _set_obsm("spatial_index", lambda i: i * 10),
        ValueError,
        r"objects of sample 'p2d_A01' have y outside the image \(0\.\.63\).*Check the table's scale",
    ),
    (
        "missing_sample_ids",
        {},
        _no_sample,
        ValueError,
        r"sample_key='sample': 2 objects have no value \(NaN\) in \.obs\['sample'\], e\.g\. \['p2d_A01_3', "
        r"'p2d_A01_6'\]; fill or drop them first",
    ),
    (
        "duplicated_obs_names",
        {},
        _dup_names,
        ValueError,
        r"table_key='nuclei_features': 1 object names occur more than once.*\['p2d_A01_1'\].*obs_names_make_unique",
    ),
    # patch size
    (
        "patch_size_zero",
        {"patch_size": (0, 16)},
        None,
        ValueError,
        r"patch_size=\(0, 16\) must be a \(height, width\) pair of positive ints, e\.g\. \(32, 32\)",
    ),
    ("patch_size_negative", {"patch_size": -3}, None, ValueError, r"patch_size=\(-3, -3\) must be"),
    (
        "patch_size_one_value",
        {"patch_size": (16,)},
        None,
        ValueError,
        r"patch_size=\(16,\) must be a \(height, width\)",
    ),
    ("patch_size_fraction", {"patch_size": (4.5, 4)}, None, ValueError, r"patch_size=\(4\.5, 4\) must be"),
    (
        "patch_size_float",
        {"patch_size": 16.0},
        None,
        TypeError,
        r"patch_size=16\.0 must be an int or a \(height, width\) pair of ints",
    ),
    ("dataset_name", {"dataset": "../escape"}, None, ValueError, r"dataset='\.\./escape' must be a non-empty name"),
    ("scale_percentile", {"scale_percentile": 60}, None, ValueError, r"scale_percentile=60 must be in \[0, 50\)"),
]


@pytest.mark.parametrize(
    ("kwargs", "edit", "exc", "match"), [c[1:] for c in DATASET_ERRORS], ids=[c[0] for c in DATASET_ERRORS]
)
def test_dataset_bad_input_raises_and_keeps_the_earlier_dataset(sd2, tmp_path, folder_digest, kwargs, edit, exc, match):
    first = _gen(sd2, tmp_path)
    before = folder_digest(tmp_path / "d")
    sdata = _with(sd2, edit=edit) if edit is not None else sd2
    with pytest.raises(exc, match=match):
        _gen(sdata, tmp_path, **kwargs)
    assert folder_digest(tmp_path / "d") == before  # the earlier dataset of that name is byte-identical
    assert len(PatchDataset.open(tmp_path / "d").index) == len(first.index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no half-written dataset or staging folder


def test_facade_wrong_keys_leave_its_state_alone(sd2, tmp_path):
    pheno = Phenocoder(sdata=sd2, seed=0)
    pheno.generate_dataset("good", tmp_path, patch_size=16, progress=False)
    for kwargs, exc, match in [
        ({"table_key": "cells"}, KeyError, r"table_key='cells'"),
        ({"sample_key": "well_id"}, KeyError, r"sample_key='well_id'"),
        ({"image_key": "DAPI"}, KeyError, r"image key='DAPI_p2d_A01'"),
    ]:
        bad = Phenocoder(sdata=sd2, **kwargs)
        with pytest.raises(exc, match=match):
            bad.generate_dataset("bad", tmp_path, patch_size=16, progress=False)
        assert bad.datasets == [] and bad.data_dir is None
    with pytest.raises(KeyError, match=r"spatial_key_index='xy'"):
        pheno.generate_dataset("bad", tmp_path, patch_size=16, spatial_key_index="xy", progress=False)
    with pytest.raises(ValueError, match=r"dir_dataset=.* differs from the folder of the earlier datasets"):
        pheno.generate_dataset("other", tmp_path / "elsewhere", patch_size=16, progress=False)
    assert pheno.datasets == ["good"] and not (tmp_path / "bad").exists()
    with pytest.raises(TypeError, match=r"sdata must be a spatialdata\.SpatialData object, got dict"):
        pheno.add_sdata({"tables": {}})
    assert pheno.sdata is sd2


def test_2d_indices_on_a_3d_image(sd3, tmp_path):
    sdata = _with(sd3, edit=_set_obsm("spatial_index", lambda i: i[:, :2]))
    with pytest.raises(
        ValueError,
        match=r"spatial_key_index='spatial_index' has 2 columns but sample 'p3d_A01' "
        r"has a 3-D image; 3-D images need \(y, x, z\) indices",
    ):
        _gen(sdata, tmp_path)


def test_z_out_of_range(sd3, tmp_path):
    sdata = _with(sd3, edit=_set_obsm("spatial_index", lambda i: np.c_[i[:, :2], i[:, 2] + 3]))
    with pytest.raises(ValueError, match=r"have z outside the image \(0\.\.2\), e\.g\. .* with z=\[\d"):
        _gen(sdata, tmp_path)


def test_2d_image_with_all_zero_z_column_is_accepted(sd2, tmp_path):
    sdata = _with(sd2, edit=_set_obsm("spatial_index", lambda i: np.c_[i, np.zeros(len(i), int)]))
    ds = _gen(sdata, tmp_path)
    assert len(ds.index) == sd2.tables[TABLE].n_obs and (ds.index["z"] == 0).all()


def test_unused_sample_category_is_not_a_sample(sd2, tmp_path):
    def edit(table):
        table.obs["sample"] = pd.Categorical(table.obs["sample"], categories=["p2d_A01", "p2d_A02", "p2d_EMPTY"])

    ds = _gen(_with(sd2, edit=edit), tmp_path)  # no image IF_p2d_EMPTY is needed: the sample has no objects
    assert ds.samples == ["p2d_A01", "p2d_A02"] and len(ds.index) == 24


def test_int_sample_ids_work_as_strings(sd2, tmp_path):
    names = {"p2d_A01": 1, "p2d_A02": 2}
    images = {f"IF_{names[k[3:]]}": v for k, v in sd2.images.items()}

    def edit(table):
        table.obs["sample"] = table.obs["sample"].astype(str).map(names).astype(int)

    ds = _gen(_with(sd2, edit=edit, images=images), tmp_path)
    assert ds.samples == ["1", "2"] and set(ds.index["sample"]) == {"1", "2"}
    assert ds.read("1").shape == (12, 16, 16, 2)


# --------------------------------------------------------------------------------------------------
# Geometry: objects on the border, odd and non-square patches
# --------------------------------------------------------------------------------------------------


def test_objects_on_the_border_are_padded_with_the_plane_minimum_and_flagged(sd2, tmp_path):
    corners = np.array([[0, 0], [63, 63], [0, 63], [32, 32]])

    def edit(table):
        index = np.asarray(table.obsm["spatial_index"]).copy()
        rows = np.flatnonzero((table.obs["sample"] == "p2d_A01").to_numpy())[:4]
        index[rows] = corners
        table.obsm["spatial_index"] = index

    ds = _gen(_with(sd2, edit=edit), tmp_path, patch_size=(9, 6))
    idx = ds.index[ds.index["sample"] == "p2d_A01"].set_index("obs_name")
    flags = idx.loc[[f"p2d_A01_{i}" for i in range(1, 5)], "padded"].tolist()
    assert flags == [True, True, True, False]
    raw = ds.read("p2d_A01", normalized=False)
    plane = np.asarray(sd2.images["IF_p2d_A01"])
    first = raw[idx.loc["p2d_A01_1", "row"]]  # object at (0, 0): top-left 4 rows and 3 columns are padding
    np.testing.assert_array_equal(first[:4, :3], np.broadcast_to(plane.min(axis=(1, 2)), (4, 3, 2)))
    np.testing.assert_array_equal(first[4:, 3:], plane[:, :5, :3].transpose(1, 2, 0))
    assert ds.settings["n_padded"] == int(ds.index["padded"].sum()) >= 3


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (15, 9), (8, 20), (64, 64), (101, 3)])
def test_odd_even_and_non_square_patch_sizes(sd2, tmp_path, size):
    ds = _gen(sd2, tmp_path, patch_size=size)
    patches = ds.read("p2d_A02")
    assert patches.shape == (12, *size, 2) and patches.dtype == np.float32
    assert 0.0 <= patches.min() and patches.max() <= 1.0
    row = ds.index[ds.index["sample"] == "p2d_A02"].iloc[0]
    plane = np.asarray(sd2.images["IF_p2d_A02"])
    windows, _ = patch_windows(plane, np.array([row["y"]]), np.array([row["x"]]), size)
    np.testing.assert_array_equal(ds.read("p2d_A02", normalized=False)[row["row"]], windows[0])


# --------------------------------------------------------------------------------------------------
# Content: constant channel, all-zero image, 8/16-bit and float images, one object
# --------------------------------------------------------------------------------------------------


def _images_like(sdata, fn):
    from spatialdata.models import Image2DModel

    return {
        k: Image2DModel.parse(fn(np.asarray(v)), dims=("c", "y", "x"), c_coords=list(v.coords["c"].values))
        for k, v in sdata.images.items()
    }


def test_constant_channel_warns_and_normalizes_to_zero(sd2, tmp_path):
    def constant_c1(arr):
        arr = arr.copy()
        arr[1] = 7
        return arr

    with pytest.warns(ConstantChannelWarning, match=r"channel 'C02' is constant \(7\.0\) in the patches of sample"):
        ds = _gen(_with(sd2, images=_images_like(sd2, constant_c1)), tmp_path)
    patches = ds.read("p2d_A01")
    assert (patches[..., 1] == 0).all() and patches[..., 0].max() > 0
    low, high = ds.anchors("p2d_A01")
    assert low[1] == 7 and high[1] == 8  # high = low + 1: no division by zero


def test_all_zero_image_gives_zero_patches_with_a_warning(sd2, tmp_path):
    with pytest.warns(ConstantChannelWarning) as record:
        ds = _gen(_with(sd2, images=_images_like(sd2, np.zeros_like)), tmp_path)
    assert len(record) >= 2  # every channel of every sample
    for sample in ds.samples:
        patches = ds.read(sample)
        assert np.isfinite(patches).all() and (patches == 0).all()


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32", "float64"])
def test_8_bit_16_bit_and_float_images(plates, sd2, tmp_path, kind):
    if kind == "uint16":
        sdata = read_plate(plates["p16"])
    elif kind.startswith("float"):
        sdata = _with(sd2, images=_images_like(sd2, lambda a: a.astype(kind) / 255.0))
    else:
        sdata = sd2
    ds = _gen(sdata, tmp_path)
    sample = ds.samples[0]
    raw = ds.read(sample, normalized=False)
    assert raw.dtype == (np.float32 if kind.startswith("float") else np.dtype(kind))  # float64 stored as float32
    norm = ds.read(sample)
    assert norm.dtype == np.float32 and norm.min() == 0.0 and 0.5 < norm.max() <= 1.0
    low, high = ds.anchors(sample)
    assert (high > low).all()


def test_sample_with_one_object(sd2, tmp_path):
    def keep_one(table):
        table.obs["sample"] = table.obs["sample"].astype(str)
        table.obs.loc[table.obs_names[0], "sample"] = "lonely"

    images = dict(sd2.images)
    images["IF_lonely"] = images["IF_p2d_A01"]
    ds = _gen(_with(sd2, edit=keep_one, images=images), tmp_path)
    assert ds.read("lonely").shape == (1, 16, 16, 2)
    assert ds.index.groupby("sample").size().to_dict() == {"lonely": 1, "p2d_A01": 11, "p2d_A02": 12}


# --------------------------------------------------------------------------------------------------
# Spatial statistics and message passing: keys, types, coordinates, empty/one-object/one-cluster samples
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def stats_pheno():
    import spatialdata as sd

    table = make_table(240, n_samples=3, n_clusters=3, extra_categories=0, n_vars=3, seed=1)
    return Phenocoder(sdata=sd.SpatialData(tables={"t": table}), table_key="t", sample_key="sample")


def _recast_leiden(pheno, dtype):
    table = pheno.sdata.tables["t"]
    table.obs["leiden"] = table.obs["leiden"].astype(dtype)


def _table_edit(pheno, fn):
    fn(pheno.sdata.tables["t"])
    return pheno


STATS_ERRORS = [
    (
        "cluster_key",
        {"cluster_key": "louvain"},
        None,
        KeyError,
        r"cluster_key='louvain' is not a column" + AVAILABLE + "Pass one of the available columns",
    ),
    ("spatial_key", {"spatial_key": "xy"}, None, KeyError, r"spatial_key='xy' is not a key of \.obsm"),
    (
        "table_key",
        {"table_key": "cells"},
        None,
        KeyError,
        r"table_key='cells' is not a table" + AVAILABLE + r"Run encode\(\) first",
    ),
    ("sample_key", None, lambda p: setattr(p, "sample_key", "well"), KeyError, r"sample_key='well' is not a column"),
    (
        "non_categorical_str",
        {},
        lambda p: _recast_leiden(p, str),
        TypeError,
        r"cluster_key='leiden': \.obs\['leiden'\] must be categorical, found dtype object\. Convert it with "
        r"adata\.obs\['leiden'\] = adata\.obs\['leiden'\]\.astype\('category'\)",
    ),
    (
        "non_categorical_int",
        {},
        lambda p: _recast_leiden(p, int),
        TypeError,
        r"must be categorical, found dtype int64",
    ),
    (
        "nan_coordinates",
        {},
        lambda p: _table_edit(p, lambda t: t.obsm.__setitem__("spatial", _first_row(np.nan)(t.obsm["spatial"]))),
        ValueError,
        r"spatial_key='spatial': \.obsm\['spatial'\] has 1 rows with NaN or inf coordinates; drop or fix",
    ),
    (
        "obsm_4_columns",
        {},
        lambda p: _table_edit(
            p, lambda t: t.obsm.__setitem__("spatial", np.c_[t.obsm["spatial"], t.obsm["spatial"][:, :1]])
        ),
        ValueError,
        r"spatial_key='spatial': \.obsm\['spatial'\] has 4 columns, expected one of \[2, 3\]",
    ),
    (
        "radius_negative",
        {"radii": (-5,)},
        None,
        ValueError,
        r"radii=\(-5,\) must be a positive number or a non-empty sequence of positive numbers .* e\.g\. \(25, 50\)",
    ),
    (
        "too_many_clusters",
        {"max_clusters": 2},
        None,
        ValueError,
        r"cluster_key='leiden' has 3 categories, more than max_clusters=2: the interaction statistics alone would "
        r"hold 9 columns per sample .* Cluster at a lower resolution .* or pass a larger max_clusters",
    ),
    ("max_clusters_not_int", {"max_clusters": 2.5}, None, ValueError, r"max_clusters=2\.5 must be an int >= 1"),
    (
        "unknown_statistic",
        {"stats": ["bogus"]},
        None,
        ValueError,
        r"stats has unknown entries \['bogus'\]; valid entries: \[.*'interactions'",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "setup", "exc", "match"), [c[1:] for c in STATS_ERRORS], ids=[c[0] for c in STATS_ERRORS]
)
def test_stats_bad_input_raises_and_keeps_the_earlier_result(stats_pheno, kwargs, setup, exc, match):
    before = stats_pheno.spatialgraph_stats(radii=(30,), progress=False).copy()
    if setup is not None:
        setup(stats_pheno)
    with pytest.raises(exc, match=match):
        stats_pheno.spatialgraph_stats(**{"radii": (30,), "progress": False, **(kwargs or {})})
    after = stats_pheno.adata  # argument errors raise before self.adata is touched
    assert after is not None and after.obs_names.tolist() == before.obs_names.tolist()
    np.testing.assert_array_equal(after.X, before.X)


def _skipped(result) -> dict[str, str]:
    obs = result.obs
    return dict(
        zip(obs.index[obs["status"] == "skipped"], obs["skipped_reason"][obs["status"] == "skipped"], strict=True)
    )


def test_empty_sample_is_skipped_and_reported(stats_pheno):
    table = stats_pheno.sdata.tables["t"]
    table.obs["sample"] = pd.Categorical(table.obs["sample"], categories=["S0", "S1", "S2", "S_empty"])
    with pytest.warns(SpatialStatsWarning, match=r"1 of 4 samples skipped .*'S_empty': no labelled objects"):
        result = stats_pheno.spatialgraph_stats(radii=(30,), progress=False)
    assert _skipped(result) == {"S_empty": "no labelled objects"}
    assert np.isnan(result["S_empty"].X).all() and np.isfinite(result["S0"].X).any()


def test_samples_with_one_object_or_one_cluster_are_skipped_and_reported(stats_pheno):
    table = stats_pheno.sdata.tables["t"]
    table.obs["sample"] = table.obs["sample"].astype(str)
    table.obs.loc[table.obs_names[0], "sample"] = "S_one_object"
    labels = table.obs["leiden"].astype(str).to_numpy(copy=True)  # writable under copy-on-write too
    labels[(table.obs["sample"] == "S1").to_numpy()] = "0"
    table.obs["leiden"] = pd.Categorical(labels, categories=["0", "1", "2"])
    with pytest.warns(SpatialStatsWarning, match=r"2 of 4 samples skipped"):
        result = stats_pheno.spatialgraph_stats(radii=(30,), progress=False)
    skipped = _skipped(result)
    assert set(skipped) == {"S1", "S_one_object"}
    assert all("only one cluster present" in reason for reason in skipped.values())
    assert (result.obs.loc[["S0", "S2"], "status"] == "ok").all()


def test_every_sample_skipped_is_an_error_naming_them(stats_pheno):
    table = stats_pheno.sdata.tables["t"]
    table.obs["leiden"] = pd.Categorical(["0"] * table.n_obs, categories=["0", "1"])
    with pytest.raises(
        ValueError,
        match=r"no spatial statistics could be computed: all 3 samples were skipped "
        r"\('S0': only one cluster present.*Check cluster_key='leiden'",
    ):
        stats_pheno.spatialgraph_stats(radii=(30,), progress=False)
    assert stats_pheno.adata is None  # documented: a failed computation leaves no stale result


def test_int_sample_ids_in_the_statistics(stats_pheno):
    table = stats_pheno.sdata.tables["t"]
    table.obs["sample"] = table.obs["sample"].map({"S0": 10, "S1": 11, "S2": 12}).astype(int)
    result = stats_pheno.spatialgraph_stats(radii=(30,), progress=False)
    assert result.obs_names.tolist() == ["10", "11", "12"] and (result.obs["status"] == "ok").all()


def test_nan_features_warn_and_only_their_moran_is_nan(stats_pheno):
    table = stats_pheno.sdata.tables["t"]
    x = np.asarray(table.X).copy()
    bad_sample = table.obs["sample"].iloc[0]
    x[0, 0] = np.nan
    table.X = x
    with pytest.warns(
        SpatialStatsWarning,
        match=r"moran_features: 1 objects have NaN/inf values in \.X "
        r"\(variables \['feat_0'\]\).*Impute or drop those objects",
    ):
        result = stats_pheno.spatialgraph_stats(radii=(30,), progress=False, stats=["moran_features"])
    df = result.to_df()
    col0, col1 = (f"radius:30_stat:moran_features_moranI_feat_{i}" for i in (0, 1))
    assert np.isnan(df.loc[bad_sample, col0]) and np.isfinite(df[col1]).all()
    assert np.isfinite(df.drop(index=bad_sample)[col0]).all()


def test_nan_features_are_an_error_for_clustering(stats_pheno):
    from phenocoder_lib.clustering import feature_matrix  # what cluster() checks first (no scanpy import here)

    table = stats_pheno.sdata.tables["t"]
    x = np.asarray(table.X).copy()
    x[3, 1] = np.inf
    table.X = x
    with pytest.raises(ValueError, match=r"1 objects have NaN/inf features; impute or drop them"):
        feature_matrix(table)
    with pytest.raises(KeyError, match=r"use_rep='X_pca' is not a key of \.obsm"):
        feature_matrix(table, use_rep="X_pca")


def test_message_passing_bad_coordinates_and_nan_features():
    rng = np.random.default_rng(0)
    coords, x = rng.uniform(0, 50, (40, 2)), rng.normal(size=(40, 3))
    bad = coords.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match=r"coords contain NaN or inf; drop or fix those objects first"):
        spatial_message_passing(bad, x, 10.0)
    with pytest.raises(ValueError, match=r"radius=-1\.0 must be >= 0 \(a finite number in units of coords\)"):
        spatial_message_passing(coords, x, -1.0)
    with pytest.raises(ValueError, match=r"coords must be \(n_objects, n_dims\) with n_objects = 40"):
        spatial_message_passing(coords[:39], x, 10.0)
    # documented: a NaN feature propagates exactly to the objects that see it (itself and its neighbours)
    x[7, 0] = np.nan
    out = spatial_message_passing(coords, x, 10.0)
    sees = np.linalg.norm(coords - coords[7], axis=1) <= 10.0
    np.testing.assert_array_equal(np.isnan(out[:, 0]), sees)
    assert np.isfinite(out[:, 1:]).all()


# --------------------------------------------------------------------------------------------------
# Files: truncated/unreadable images, missing channel or slice, labels not in masks, names, exports
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def copy_of(plates, tmp_path):
    def _copy(name: str) -> Path:
        return Path(shutil.copytree(plates[name], tmp_path / name))

    return _copy


def _first(folder: Path, contains: str = "") -> Path:
    return sorted(p for p in folder.iterdir() if contains in p.name)[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_image_names_the_file_and_keeps_the_earlier_dataset(copy_of, tmp_path, folder_digest, damage):
    root = copy_of("p2d")
    _gen(read_plate(root), tmp_path / "out")
    before = folder_digest(tmp_path / "out" / "d")
    victim = _first(root / "imgs", "_A02_")
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not an image", "empty": b""}[damage])
    sdata = read_plate(root, wells=["A01"])  # the damaged well is not read
    assert sdata.tables[TABLE].n_obs == 12
    with pytest.raises(OSError, match=rf"(?s)cannot read image file '.*{victim.name}': .*Re-export or remove the file"):
        _gen(read_plate(root), tmp_path / "out")  # lazy: the error surfaces when the pixels are read
    assert folder_digest(tmp_path / "out" / "d") == before


@pytest.mark.parametrize(
    ("plate", "what", "match"),
    [
        (
            "p2d",
            "channel",
            r"plate 'p2d' is incomplete: 1 image or label files are missing, e\.g\. \['A02 z=0 channel="
            r"C0\d'\]\. Wait until the export has finished, or remove the incomplete well",
        ),
        (
            "p3d",
            "slice",
            r"plate 'p3d' is incomplete: tables name z-slices \[2\] that have no images \(image z: \[1, 3\]\)\. "
            r"Wait until the export has finished, or re-export the missing slices",
        ),
        ("p3d", "label", r"is incomplete: 1 image or label files are missing, e\.g\. \['label A01 z=2'\]"),
    ],
)
def test_missing_channel_slice_or_mask(copy_of, plate, what, match):
    root = copy_of(plate)
    if what == "channel":
        _first(root / "imgs", "_A02_").unlink()
    elif what == "slice":
        for path in (root / "imgs").glob("*Z02C*"):
            path.unlink()
    else:
        _first(root / "labels", "Z02").unlink()
    with pytest.raises(FileNotFoundError, match=match):
        read_plate(root)


def test_table_labels_not_in_the_masks(copy_of):
    root = copy_of("p2d")
    table = root / "tables" / "A02.csv"
    df = pd.read_csv(table)
    df.loc[[0, 1], "label"] = [900, 901]
    df.to_csv(table, index=False)
    with pytest.raises(
        ValueError,
        match=r"table '.*A02\.csv' names 2 label ids that do not occur in its mask "
        r"'.*_A02_.*': \[900, 901\].*re-export them together, or pass "
        r"read_plate\(\.\.\., check_labels=False\)",
    ):
        read_plate(root)
    kept = read_plate(root, check_labels=False).tables[TABLE]  # the documented escape hatch
    assert {900, 901} <= set(kept.obs["instance_id"].astype(int))


def test_table_without_label_or_centroid_columns(copy_of):
    root = copy_of("p2d")
    table = root / "tables" / "A01.csv"
    pd.read_csv(table).rename(columns={"label": "id"}).to_csv(table, index=False)
    with pytest.raises(KeyError, match=r"table '.*A01\.csv' lacks columns \['label'\].*PlateLayout\(label_column"):
        read_plate(root)


def test_file_names_that_do_not_match_the_pattern(copy_of, caplog):
    root = copy_of("p2d")
    (root / "imgs" / "notes_A01.png").write_bytes(b"stray")
    with caplog.at_level(logging.WARNING, logger="phenocoder_lib.ingest"):
        files = scan_plate(root)  # a stray file is ignored, with a warning naming it
    assert "notes_A01.png" in caplog.text and "do not match the pattern" in caplog.text
    assert files.wells == ["A01", "A02"]
    with pytest.raises(
        FileNotFoundError,
        match=r"no image file in '.*imgs' matches the pattern 'nomatch.*' "
        r"\(e\.g\. '.*' does not match\); pass PlateLayout\(image_pattern=",
    ):
        scan_plate(root, layout=PlateLayout(image_pattern=r"nomatch(?P<well>x)(?P<channel>y)"))
    with pytest.raises(FileNotFoundError, match=r"plate folder '.*nowhere' does not exist"):
        scan_plate(root.parent / "nowhere")


def test_export_still_being_written(tmp_path):
    root = tmp_path / "WIP"
    make_synthetic_plate(
        root, n_wells=2, ndim=2, n_channels=2, image_size=48, nuclei_per_well=8, seed=6, write_marker=False
    )
    assert not (root / "EXPORT_COMPLETE").exists()
    last = _first(root / "labels", "_A02_")
    data = last.read_bytes()
    last.unlink()  # the exporter has not written the last mask yet
    with pytest.raises(
        FileNotFoundError,
        match=r"'WIP' is incomplete.*\['label A02 z=0'\]\. Wait until the export "
        r"has finished",
    ):
        read_plate(root, wells=["A01"])  # even for a complete well: the plate is checked as a whole
    last.write_bytes(data)  # the export finishes
    assert read_plate(root).tables[TABLE].n_obs == 16


def test_bad_plate_ids_and_scale(copy_of):
    root = copy_of("p2d")
    with pytest.raises(ValueError, match=r"plate='bad/id' is not a valid plate id.*Rename the folder or pass plate="):
        scan_plate(root, plate="bad/id")
    with pytest.raises(ValueError, match=r"pixel_size_um=-1\.0 must be a positive number"):
        read_plate(root, pixel_size_um=-1.0)
    with pytest.raises(KeyError, match=r"wells=\['Z99'\] are not in plate 'p2d'; available wells: \['A01', 'A02'\]"):
        read_plate(root, wells=["Z99"])
