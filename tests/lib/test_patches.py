from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phenocoder_lib import Phenocoder
from phenocoder_lib.ingest import read_plate
from phenocoder_lib.patches import (
    IntensityAccumulator,
    PatchDataset,
    anchors_from,
    compute_anchors,
    generate_dataset,
    normalize,
    patch_windows,
)


@pytest.fixture(scope="module")
def sdata3d(synthetic_plate_3d):
    return read_plate(synthetic_plate_3d)


def _gen(sdata, tmp_path, **kw):
    args = dict(dataset="d1", dir_dataset=tmp_path, table_key="nuclei_features", sample_key="sample",
                image_key="IF", patch_size=(16, 16))
    args.update(kw)
    return generate_dataset(sdata, **args)


# ---- the crop itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(4, 4), (5, 5), (4, 7), (1, 1)])
def test_window_is_centred_on_object(size):
    plane = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 20, 30)
    ys, xs = np.array([10, 3, 15]), np.array([12, 20, 7])
    patches, padded = patch_windows(plane, ys, xs, size)
    h, w = size
    assert patches.shape == (3, h, w, 2) and patches.dtype == np.uint16
    for i in range(3):
        # the object's own pixel sits at (h // 2, w // 2) of its patch, for odd and even sizes
        np.testing.assert_array_equal(patches[i, h // 2, w // 2], plane[:, ys[i], xs[i]])
        y0, x0 = ys[i] - h // 2, xs[i] - w // 2
        np.testing.assert_array_equal(patches[i], plane[:, y0: y0 + h, x0: x0 + w].transpose(1, 2, 0))
    assert not padded.any()


def test_border_objects_are_padded_with_plane_minimum():
    plane = np.full((2, 10, 10), 7, np.uint8)
    plane[1] = 9
    plane[:, 0, 0] = [50, 60]
    patches, padded = patch_windows(plane, np.array([0, 9, 5]), np.array([0, 9, 5]), (6, 6))
    assert padded.tolist() == [True, True, False]
    assert patches[0, 3, 3].tolist() == [50, 60]  # object pixel at the centre
    assert patches[0, 0, 0].tolist() == [7, 9]  # padding = per-channel minimum (background)
    assert patches.shape == (3, 6, 6, 2)


@given(
    h=st.integers(1, 9), w=st.integers(1, 9),
    ys=st.lists(st.integers(0, 11), min_size=1, max_size=5), seed=st.integers(0, 100),
)
@settings(max_examples=40, deadline=None)
def test_window_property(h, w, ys, seed):
    rng = np.random.default_rng(seed)
    plane = rng.integers(1, 200, size=(3, 12, 13)).astype(np.uint8)
    ys = np.array(ys)
    xs = rng.integers(0, 13, size=len(ys))
    patches, padded = patch_windows(plane, ys, xs, (h, w))
    assert patches.shape == (len(ys), h, w, 3)
    np.testing.assert_array_equal(patches[:, h // 2, w // 2, :], plane[:, ys, xs].T)
    inside = (ys - h // 2 >= 0) & (xs - w // 2 >= 0) & (ys - h // 2 + h <= 12) & (xs - w // 2 + w <= 13)
    np.testing.assert_array_equal(padded, ~inside)


# ---- anchors and normalization ---------------------------------------------------------------------


def test_anchors_use_foreground_not_background():
    rng = np.random.default_rng(0)
    patches = np.zeros((100, 16, 16, 2), np.uint8)  # 95 % background
    fg = rng.random(patches.shape[:3]) < 0.05
    patches[..., 0][fg] = rng.integers(50, 201, size=fg.sum())
    acc = IntensityAccumulator(2, np.uint8)
    acc.add(patches)
    with pytest.warns(UserWarning, match="constant"):
        a = anchors_from(acc, 1.0, ["C1", "C2"], "test")
    assert a["low"] == [0.0, 0.0]
    assert 190 <= a["high"][0] <= 200  # 99th percentile of the foreground, not of all pixels
    assert a["high"][1] == 1.0  # constant channel: high = low + 1
    out = normalize(patches, a["low"], a["high"])
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert (out[..., 0][fg] >= 1).mean() < 0.05  # the foreground is not saturated
    assert len(np.unique(out[..., 0])) > 100


@given(st.floats(0, 10), st.integers(0, 10**6))
@settings(max_examples=30, deadline=None)
def test_histogram_quantiles_match_numpy(p, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 4096, size=(20, 4, 4, 1)).astype(np.uint16)
    acc = IntensityAccumulator(1, np.uint16)
    acc.add(data[:10])
    acc.add(data[10:])
    q = [p / 100, 0.5, 1 - p / 100]
    np.testing.assert_allclose(acc.quantiles(0, q), np.quantile(data.ravel(), q, method="inverted_cdf"))
    s = acc.stats(0, p)
    assert s["mean"] == pytest.approx(data.mean()) and s["std"] == pytest.approx(data.std())
    assert s["min"] == data.min() and s["max"] == data.max()
    assert s["mad"] == pytest.approx(np.quantile(np.abs(data - s["median"]).ravel(), 0.5, method="inverted_cdf"))


# ---- datasets on disk ------------------------------------------------------------------------------


def test_every_object_gets_a_patch(sdata3d, tmp_path):
    ds = _gen(sdata3d, tmp_path)
    table = sdata3d.tables["nuclei_features"]
    assert len(ds.index) == len(table)
    assert set(ds.index["obs_name"]) == set(table.obs_names)
    assert ds.settings["n_padded"] == int(ds.index["padded"].sum())
    total = 0
    for sample in ds.samples:
        patches = ds.read(sample)
        n = (ds.index["sample"] == sample).sum()
        assert patches.shape == (n, 16, 16, 4) and patches.dtype == np.float32
        assert 0 <= patches.min() and patches.max() <= 1
        total += n
        raw = ds.read(sample, normalized=False)
        assert raw.dtype == np.uint8
    assert total == len(table)


def test_patch_content_matches_image(sdata3d, tmp_path):
    ds = _gen(sdata3d, tmp_path, patch_size=(9, 12))
    row = ds.index[~ds.index["padded"]].iloc[5]
    raw = ds.read(row["sample"], np.array([row["row"]]), normalized=False)[0]
    image = np.asarray(sdata3d.images[f"IF_{row['sample']}"])
    y, x, z = row["y"], row["x"], row["z"]
    np.testing.assert_array_equal(raw, image[:, z, y - 4: y + 5, x - 6: x + 6].transpose(1, 2, 0))


def test_settings_and_stats_saved(sdata3d, tmp_path):
    ds = _gen(sdata3d, tmp_path, scale_percentile=2, scale_per_sample=False, metadata_keys=["well", "n_slices"])
    settings = json.loads((tmp_path / "d1" / "settings.json").read_text())
    norm = settings["normalization"]
    assert norm["scale_per_sample"] is False and norm["scale_percentile"] == 2
    assert len(norm["global"]["high"]) == 4 and norm["per_sample"] == {}
    assert {"well", "n_slices", "dataset"} <= set(ds.index)
    stats = ds.stats()
    assert len(stats) == 3 * 4
    assert {"sample_id", "channel", "mean", "std", "median", "mad", "percentile_low", "percentile_high"} <= set(stats)
    low, high = ds.anchors(ds.samples[0])
    assert (high > low).all()


def test_seeded_subsets_are_reproducible(sdata3d, tmp_path):
    a = _gen(sdata3d, tmp_path / "a", n_samples=2, n_patches=50)
    b = _gen(sdata3d, tmp_path / "b", n_samples=2, n_patches=50)
    c = generate_dataset(sdata3d, dataset="d1", dir_dataset=tmp_path / "c", table_key="nuclei_features",
                         sample_key="sample", image_key="IF", patch_size=16, n_samples=2, n_patches=50, seed=7)
    assert len(a.index) == 50 and a.index["sample"].nunique() <= 2
    assert a.index["obs_name"].tolist() == b.index["obs_name"].tolist()
    assert a.index["obs_name"].tolist() != c.index["obs_name"].tolist()
    for s in a.samples:  # only selected samples are stored, and all of them are
        assert len(a.read(s)) == (a.index["sample"] == s).sum()


def test_unseen_sample_gets_own_anchors(sdata3d, tmp_path):
    ds = _gen(sdata3d, tmp_path, n_samples=1)
    raw = ds.read(ds.samples[0], normalized=False)
    anchors = compute_anchors(raw, ds.settings)
    np.testing.assert_allclose(anchors["high"], ds.settings["normalization"]["per_sample"][ds.samples[0]]["high"])


def test_facade_accumulates_datasets(sdata3d, tmp_path):
    pheno = Phenocoder(sdata=sdata3d, table_key="nuclei_features", sample_key="sample", image_key="IF")
    pheno.generate_dataset("first", tmp_path, patch_size=(16, 16), progress=False)
    pheno.generate_dataset("second", tmp_path, patch_size=(16, 16), n_patches=20, progress=False)
    pheno.generate_dataset("second", tmp_path, patch_size=(16, 16), n_patches=30, progress=False)
    assert pheno.datasets == ["first", "second"] and pheno.data_dir == tmp_path
    assert [len(d.index) for d in pheno.open_datasets()] == [len(sdata3d.tables["nuclei_features"]), 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]  # no temporary leftovers
    assert "datasets: 2 dataset(s)" in repr(pheno)


def test_2d_uint16_int_sample_ids(synthetic_plate_2d, tmp_path):
    sdata = read_plate(synthetic_plate_2d)
    table = sdata.tables["nuclei_features"]
    # integer sample ids and other key names
    mapping = {s: i for i, s in enumerate(table.obs["sample"].cat.categories)}
    table.obs["plate_well"] = table.obs["sample"].map(mapping).astype(int)
    for s, i in mapping.items():
        sdata.images[f"DAPI_{i}"] = sdata.images[f"IF_{s}"]
    ds = generate_dataset(sdata, dataset="d", dir_dataset=tmp_path, table_key="nuclei_features",
                          sample_key="plate_well", image_key="DAPI", patch_size=(7, 10))
    assert ds.samples == ["0", "1"]
    p = ds.read("1")
    assert p.shape[1:] == (7, 10, 3) and p.dtype == np.float32
    assert ds.read("1", normalized=False).dtype == np.uint16


def test_float_images(synthetic_plate_2d, tmp_path):
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    sdata = read_plate(synthetic_plate_2d)
    images = {k: Image2DModel.parse(np.asarray(v).astype(np.float64) / 65535.0, dims=("c", "y", "x"),
                                    c_coords=list(v.coords["c"].values)) for k, v in sdata.images.items()}
    fsd = sd.SpatialData(images=images, tables=dict(sdata.tables))
    ds = generate_dataset(fsd, dataset="f", dir_dataset=tmp_path, table_key="nuclei_features",
                          sample_key="sample", image_key="IF", patch_size=8)
    assert ds.settings["store_dtype"] == "float32"  # never float64
    assert ds.read(ds.samples[0], normalized=False).dtype == np.float32
    assert ds.read(ds.samples[0]).max() <= 1.0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"table_key": "nope"}, KeyError, "table_key='nope'"),
        ({"sample_key": "nope"}, KeyError, "sample_key='nope'"),
        ({"image_key": "nope"}, KeyError, "nope_"),
        ({"spatial_key_index": "nope"}, KeyError, "spatial_key_index='nope'"),
        ({"spatial_key_index": "spatial"}, TypeError, "integer pixel indices"),
        ({"patch_size": (0, 4)}, ValueError, "patch_size"),
        ({"patch_size": (4.5, 4)}, ValueError, "patch_size"),
        ({"scale_percentile": 60}, ValueError, r"scale_percentile=60 must be in \[0, 50\) \(percent"),
        ({"scale_percentile": float("nan")}, ValueError, "scale_percentile=nan"),
        ({"n_samples": 9}, ValueError, r"n_samples=9 must be in \[1, 3\] \(between 1 and the number of samples\)"),
        ({"n_patches": 0}, ValueError, "n_patches=0 must be >= 1"),
        ({"metadata_keys": ["nope"]}, KeyError, "metadata_keys='nope'"),
        ({"dataset": "../x"}, ValueError, "dataset="),
    ],
)
def test_bad_arguments(sdata3d, tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _gen(sdata3d, tmp_path, **kwargs)
    assert not (tmp_path / "d1").exists()


def test_out_of_image_index_is_an_error_and_keeps_earlier_dataset(sdata3d, tmp_path):
    first = _gen(sdata3d, tmp_path)
    table = sdata3d.tables["nuclei_features"]
    saved = table.obsm["spatial_index"].copy()
    try:
        table.obsm["spatial_index"][3, 2] = 99  # z out of range
        with pytest.raises(ValueError, match="z outside the image"):
            _gen(sdata3d, tmp_path)
    finally:
        table.obsm["spatial_index"] = saved
    again = PatchDataset.open(tmp_path / "d1")
    assert len(again.index) == len(first.index)


@pytest.mark.slow
def test_real_plate_patches_keep_every_channel_graded(plate_3d_path, plate_3d_geometry, tmp_path):
    sdata = read_plate(plate_3d_path, **plate_3d_geometry)
    ds = generate_dataset(sdata, dataset="real", dir_dataset=tmp_path, table_key="nuclei_features",
                          sample_key="sample", image_key="IF", patch_size=32)
    assert len(ds.index) == 11947
    assert ds.index.groupby("sample").size().to_dict() == {
        "plate_3d_A06": 4959, "plate_3d_G04": 1420, "plate_3d_H03": 5568}
    for sample in ds.samples:
        patches = ds.read(sample)
        for c in range(patches.shape[-1]):
            values = patches[..., c]
            fg = values[values > 0]
            # no channel becomes binary: many grey levels and little saturation of the foreground
            assert len(np.unique(values)) >= 10, (sample, c)
            assert (fg >= 1).mean() < 0.1, (sample, c)
