from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.ingest import (
    MIN_PIXELS_FOR_POOL,
    PlateLayout,
    image_pixels,
    ingest_plate,
    ingest_worker_count,
    read_plate,
    scan_plate,
    write_sdata,
)
from phenocoder_lib.synthetic import make_synthetic_plate, read_ground_truth


def test_synthetic_3d_plate_ingests_with_truth(synthetic_plate_3d):
    sdata = read_plate(synthetic_plate_3d)
    table = sdata.tables["nuclei_features"]
    objects, wells = read_ground_truth(synthetic_plate_3d)
    assert len(table) == len(objects) > 250
    assert sorted(sdata.images) == [f"IF_synth3d_{w}" for w in wells["well"]]
    assert sorted(sdata.labels) == [f"nuclei_synth3d_{w}" for w in wells["well"]]
    img = sdata.images["IF_synth3d_A01"]
    assert img.dims == ("c", "z", "y", "x") and img.shape == (4, 5, 160, 160) and img.dtype == np.uint8
    assert list(img.coords["c"].values) == ["C01", "C02", "C03", "C04"]
    # lazily loaded
    assert type(img.data).__module__.startswith("dask")
    obs = table.obs
    assert {"sample", "plate", "well", "instance_id", "region", "area", "n_slices", "z_index"} <= set(obs)
    assert (obs["plate"] == "synth3d").all()
    assert (obs["sample"].astype(str) == "synth3d_" + obs["well"].astype(str)).all()
    assert list(table.var_names) == [f"intensity_mean-{c}" for c in range(4)]
    assert table.obsm["spatial"].shape == (len(table), 3)
    idx = table.obsm["spatial_index"]
    assert idx.dtype.kind == "i" and idx.shape == (len(table), 3)
    assert idx[:, :2].min() >= 0 and idx[:, :2].max() < 160 and idx[:, 2].max() < 5
    # every label id in the table exists in the mask of its well, at its index
    for sample in obs["sample"].cat.categories[:1]:
        sub = obs["sample"] == sample
        labels = np.asarray(sdata.labels[f"nuclei_{sample}"])
        ids = obs.loc[sub, "instance_id"].to_numpy()
        y, x, z = idx[sub.to_numpy()].T
        assert np.mean(labels[z, y, x] == ids) > 0.95  # centroid pixel lies inside its own nucleus
    # table links to the labels
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region_key"] == "region" and attrs["instance_key"] == "instance_id"
    assert sorted(attrs["region"]) == sorted(sdata.labels)


def test_physical_units_and_override(synthetic_plate_3d):
    base = read_plate(synthetic_plate_3d).tables["nuclei_features"]  # plate.json: 1 um pixels, 2 um z-step
    scaled = read_plate(synthetic_plate_3d, pixel_size_um=0.5, z_step_um=3.0).tables["nuclei_features"]
    np.testing.assert_allclose(scaled.obsm["spatial"][:, :2], base.obsm["spatial"][:, :2] * 0.5)
    np.testing.assert_allclose(scaled.obsm["spatial"][:, 2], base.obsm["spatial"][:, 2] / 2.0 * 3.0)
    np.testing.assert_array_equal(scaled.obsm["spatial_index"], base.obsm["spatial_index"])


def test_2d_uint16_plate(synthetic_plate_2d):
    sdata = read_plate(synthetic_plate_2d, plate="P2")
    table = sdata.tables["nuclei_features"]
    img = sdata.images["IF_P2_A01"]
    assert img.dims == ("c", "y", "x") and img.dtype == np.uint16 and img.shape[0] == 3
    assert table.obsm["spatial"].shape[1] == 2 and table.obsm["spatial_index"].shape[1] == 2
    assert "volume_um3" not in table.obs


def test_select_wells_and_keys(synthetic_plate_3d):
    sdata = read_plate(synthetic_plate_3d, wells=["A02"], image_key="DAPI", table_key="cells", sample_key="well_id")
    assert list(sdata.images) == ["DAPI_synth3d_A02"]
    assert set(sdata.tables["cells"].obs["well_id"]) == {"synth3d_A02"}
    with pytest.raises(KeyError, match="wells=.*Z99"):
        read_plate(synthetic_plate_3d, wells=["Z99"])


def test_area_weighted_aggregation(tmp_path):
    root = tmp_path / "plate"
    make_synthetic_plate(root, n_wells=1, ndim=3, image_size=64, n_z=3, nuclei_per_well=4, seed=3)
    frames = [pd.read_csv(p) for p in sorted((root / "tables").glob("*.csv"))]
    raw = pd.concat(frames)
    obj = raw.groupby("label").filter(lambda g: len(g) > 1)["label"].iloc[0]
    rows = raw[raw["label"] == obj]
    expected = np.average(rows["intensity_mean-0"], weights=rows["area"])
    table = read_plate(root).tables["nuclei_features"]
    got = table[table.obs["instance_id"] == obj].X[0, 0]
    assert got == pytest.approx(expected, rel=1e-5)
    row = table.obs[table.obs["instance_id"] == obj].iloc[0]
    assert row["n_slices"] == len(rows)
    assert row["z_index"] == rows["z_stack"].to_numpy()[rows["area"].to_numpy().argmax()] - 1


def test_missing_file_and_bad_pattern(tmp_path, synthetic_plate_2d):
    root = tmp_path / "broken"
    shutil.copytree(synthetic_plate_2d, root)
    victim = sorted((root / "imgs").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        scan_plate(root)
    with pytest.raises(FileNotFoundError, match="matches the pattern"):
        scan_plate(synthetic_plate_2d, layout=PlateLayout(image_pattern=r"nomatch(?P<well>x)(?P<channel>y)"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_plate(tmp_path / "nowhere")


def test_write_is_atomic_and_readable(tmp_path, synthetic_plate_2d):
    import spatialdata as sd

    sdata = read_plate(synthetic_plate_2d)
    out = write_sdata(sdata, tmp_path / "plate.zarr")
    # as after sdata.write: the object points at the store in its final place, not at the folder written aside
    assert sdata.path == out and "plate.zarr" in repr(sdata)
    back = sd.read_zarr(out)
    assert sorted(back.images) == sorted(sdata.images)
    np.testing.assert_array_equal(back.tables["nuclei_features"].X, sdata.tables["nuclei_features"].X)
    # a failing write leaves the earlier result intact and no temporary folder behind

    class Boom:
        def write(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_sdata(Boom(), out)
    assert sorted(sd.read_zarr(out).images) == sorted(sdata.images)
    assert [p.name for p in tmp_path.iterdir()] == ["plate.zarr"]


def test_write_sdata_has_anndata_look_zarrs_version_up_once(tmp_path, synthetic_plate_2d):
    import importlib.metadata

    from anndata._io.specs import methods

    write_sdata(read_plate(synthetic_plate_2d, wells=["A01"]), tmp_path / "a.zarr")
    assert methods.version is not importlib.metadata.version  # memoized (6 % of a well's CPU time)
    assert methods.version("zarr") == importlib.metadata.version("zarr")
    assert methods.version.cache_info().hits > 10  # one lookup per table array before


@pytest.mark.parametrize("plate", ["synthetic_plate_2d", "synthetic_plate_3d"])
def test_write_sdata_writes_the_files_of_spatialdata_write(plate, request, tmp_path, folder_digest):
    # write_sdata writes the element types side by side and the tables from memory: the same bytes as
    # SpatialData.write, for a whole plate (several images and labels: the labels group's shared list)
    sdata = read_plate(request.getfixturevalue(plate))
    ours = write_sdata(sdata, tmp_path / "ours.zarr")
    read_plate(request.getfixturevalue(plate)).write(tmp_path / "theirs.zarr")
    assert len(list(ours.rglob("zarr.json"))) > 20
    assert folder_digest(ours) == folder_digest(tmp_path / "theirs.zarr")


@pytest.mark.parametrize("plate", ["synthetic_plate_2d", "synthetic_plate_3d"])
def test_ingest_plate_in_worker_processes_writes_each_wells_store(plate, request, tmp_path, folder_digest):
    # every well in a worker process: the same stores as read_plate(wells=[w]) + write_sdata in this process
    root = request.getfixturevalue(plate)
    wells = scan_plate(root).wells
    result = ingest_plate(root, tmp_path / "par", workers=2, table_key="cells", image_key="DAPI")
    assert list(result.index) == [f"{root.name}_{w}" for w in wells] and list(result["well"]) == wells
    assert {"n_objects", "path", "seconds_read", "seconds_write", "cpu_s"} <= set(result.columns)
    assert (result["cpu_s"] > 0).all() and (result["peak_rss_mb"] > 50).all()
    for well in wells:
        sdata = read_plate(root, wells=[well], table_key="cells", image_key="DAPI")
        mine = write_sdata(sdata, tmp_path / "seq" / f"{well}.zarr")
        row = result.loc[f"{root.name}_{well}"]
        assert row["n_objects"] == sdata.tables["cells"].n_obs > 0
        assert folder_digest(row["path"]) == folder_digest(mine)
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == sorted(f"{root.name}_{w}.zarr" for w in wells)


def test_ingest_uses_worker_processes_where_the_pixels_pay_for_them(synthetic_plate_3d, monkeypatch):
    monkeypatch.delenv("PHENOCODER_MAX_WORKERS", raising=False)
    files = scan_plate(synthetic_plate_3d)
    # 3 wells x 4 channels x 5 slices of 160 x 160 pixels
    assert image_pixels(files, files.wells) == 3 * 4 * 5 * 160 * 160
    assert image_pixels(files, files.wells[:1]) == 4 * 5 * 160 * 160
    assert ingest_worker_count(None, 3, image_pixels(files, files.wells)) == 1  # a small plate: in this process
    assert ingest_worker_count(None, 3, MIN_PIXELS_FOR_POOL) == min(3, len(os.sched_getaffinity(0)))
    assert ingest_worker_count(None, 1, 10 * MIN_PIXELS_FOR_POOL) == 1  # one well: nothing to share
    assert ingest_worker_count(2, 3, 0) == 2  # asked for


def test_ingest_plate_without_worker_processes_ingests_here(tmp_path, synthetic_plate_2d, monkeypatch, caplog):
    import phenocoder_lib.parallel as parallel

    def no_processes(*a, **k):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(parallel, "PrefetchPool", no_processes)
    result = ingest_plate(synthetic_plate_2d, tmp_path / "out", workers=2)
    assert len(result) == len(scan_plate(synthetic_plate_2d).wells) and (result["n_objects"] > 0).all()
    assert "no worker processes (OSError" in caplog.text


def test_ingest_plate_errors_name_the_well_and_keep_finished_wells(tmp_path, plate_copy, folder_digest):
    root = plate_copy("synth3d")
    wells = scan_plate(root).wells
    out = tmp_path / "out"
    ingest_plate(root, out, wells=wells[:1], workers=1)
    before = folder_digest(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ingest_plate(root, out, overwrite=False, workers=2)
    assert folder_digest(out) == before  # refused before anything was written
    victim = sorted((root / "imgs").glob(f"*_{wells[1]}_*"))[0]
    victim.write_bytes(b"not a png")  # the second well's file is broken
    with pytest.raises(OSError, match="cannot read image file") as err:
        ingest_plate(root, out, workers=2)
    assert any(f"well {wells[1]!r}" in note for note in err.value.__notes__)
    stores = sorted(p.name for p in out.iterdir())
    assert f"synth3d_{wells[0]}.zarr" in stores and f"synth3d_{wells[1]}.zarr" not in stores
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written left behind
    with pytest.raises(ValueError, match="workers=0"):
        ingest_plate(root, out, workers=0)
    with pytest.raises(KeyError, match="Z99"):
        ingest_plate(root, out, wells=["Z99"])


@pytest.mark.parametrize("plate", ["synthetic_plate_2d", "synthetic_plate_3d"])
def test_a_wells_own_files_read_as_a_scan_does_without_scanning(plate, request, monkeypatch):
    import phenocoder_lib.ingest as ingest

    root = request.getfixturevalue(plate)
    files = scan_plate(root)
    own = files.per_well()
    assert list(own) == files.wells
    for well, mine in own.items():
        assert mine.wells == [well] and mine.plate == files.plate and mine.root == files.root
        assert (mine.channels, mine.z_levels, mine.is_3d) == (files.channels, files.z_levels, files.is_3d)
        assert mine.reference_image == files.reference_image == next(iter(files.images.values()))
        for name in ("images", "labels", "tables"):
            assert getattr(mine, name) == {k: p for k, p in getattr(files, name).items() if k[0] == well}
    assert sum(len(m.images) for m in own.values()) == len(files.images)
    well = files.wells[-1]
    scanned = read_plate(root, wells=[well], table_key="cells")

    def no_scan(*a, **k):
        raise AssertionError("the plate was scanned again")

    monkeypatch.setattr(ingest, "scan_plate", no_scan)
    given = read_plate(root, wells=[well], table_key="cells", files=own[well])
    (name,) = given.images
    assert list(scanned.images) == [name] and list(scanned.labels) == list(given.labels)
    np.testing.assert_array_equal(given.images[name].values, scanned.images[name].values)
    (label,) = given.labels
    np.testing.assert_array_equal(given.labels[label].values, scanned.labels[label].values)
    pd.testing.assert_frame_equal(given.tables["cells"].obs, scanned.tables["cells"].obs, check_exact=True)
    np.testing.assert_array_equal(given.tables["cells"].X, scanned.tables["cells"].X)
    assert given.tables["cells"].uns["phenocoder_ingest"] == scanned.tables["cells"].uns["phenocoder_ingest"]


def test_a_wells_own_files_refuse_other_wells_and_plates(tmp_path, synthetic_plate_2d, synthetic_plate_3d):
    files = scan_plate(synthetic_plate_2d)
    with pytest.raises(KeyError, match="Z99"):
        files.per_well(["Z99"])
    own = files.per_well(files.wells[:1])
    assert list(own) == files.wells[:1]
    with pytest.raises(KeyError, match=files.wells[1]):
        read_plate(synthetic_plate_2d, wells=[files.wells[1]], files=own[files.wells[0]])
    with pytest.raises(ValueError, match="files= is the scan of plate"):
        read_plate(synthetic_plate_3d, files=files)
    with pytest.raises(ValueError, match="plate='OTHER'"):
        read_plate(synthetic_plate_2d, files=files, plate="OTHER")


def test_ingest_plate_scans_the_plate_once_and_checks_every_well_against_its_first_image(
        tmp_path, plate_copy, plate_scans):
    import imageio.v3 as iio

    root = plate_copy("synth3d")
    result = ingest_plate(root, tmp_path / "out", workers=1)
    assert len(result) == 3 and len(plate_scans) == 1  # one scan, not one per well
    wells = list(result["well"])
    # a well whose images are not the shape of the plate's first image is refused, as when it scanned
    victim = sorted((root / "imgs").glob(f"*_{wells[2]}_*"))[0]
    iio.imwrite(victim, np.zeros((40, 40), np.uint8))
    with pytest.raises(ValueError, match=r"has shape \(40, 40\), but the plate's images are \(160, 160\)"):
        ingest_plate(root, tmp_path / "out2", wells=[wells[2]], workers=1)


@pytest.fixture
def libpng_decodes(monkeypatch) -> list[int]:
    """The planes decoded by libpng (``imagecodecs.png_decode``) during the test: their sizes in bytes."""
    import imagecodecs

    calls: list[int] = []
    real = imagecodecs.png_decode

    def counted(data, *args, **kwargs):
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(imagecodecs, "png_decode", counted)
    return calls


@pytest.mark.parametrize("kind", ["gray8", "gray16", "gray8_transparency", "rgb8", "gray_interlaced"])
def test_png_planes_decode_to_imageios_pixels(tmp_path, kind, libpng_decodes):
    """Grayscale 8/16-bit PNGs are decoded by libpng (the fast path), anything else by imageio: same pixels."""
    import imageio.v3 as iio
    from PIL import Image

    from phenocoder_lib.ingest import read_plane

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 255, (37, 53)).astype(np.uint8)
    path = tmp_path / f"{kind}.png"
    if kind == "gray8":
        iio.imwrite(path, gray)
    elif kind == "gray16":
        iio.imwrite(path, (gray.astype(np.uint16) * 257 + 3))
    elif kind == "gray8_transparency":  # a tRNS chunk: libpng adds an alpha plane, so imageio decodes it
        Image.fromarray(gray).save(path, transparency=7)
    elif kind == "rgb8":
        iio.imwrite(path, np.stack([gray, gray // 2, gray // 3], axis=-1))
    else:  # Adam7-interlaced: a 1x1 image's only pass holds its pixel, so its IDAT is that of the plain file
        gray = gray[:1, :1]
        Image.fromarray(gray).save(path)
        data = bytearray(path.read_bytes())
        data[28] = 1  # the interlace byte of IHDR, then the chunk's CRC
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
        path.write_bytes(bytes(data))
    expected = iio.imread(path)
    expected = expected[..., 0] if expected.ndim == 3 else expected
    got = read_plane(path)
    assert len(libpng_decodes) == (1 if kind in ("gray8", "gray16", "gray8_transparency") else 0)
    assert got.dtype == expected.dtype and got.shape == gray.shape
    np.testing.assert_array_equal(got, expected)


def test_real_plate_png_planes_decode_to_imageios_pixels(plate_3d_path, libpng_decodes):
    import imageio.v3 as iio

    from phenocoder_lib.ingest import read_plane

    paths = sorted((plate_3d_path / "imgs").glob("*.png"))[::40]
    assert len(paths) >= 10
    for path in paths:
        np.testing.assert_array_equal(read_plane(path), iio.imread(path))
    assert len(libpng_decodes) == len(paths)


def test_slices_read_in_parallel_equal_one_at_a_time(synthetic_plate_3d, monkeypatch):
    import phenocoder_lib.ingest as ingest

    files = scan_plate(synthetic_plate_3d)
    geometry = ingest.read_plate_geometry(synthetic_plate_3d)
    well = files.wells[0]
    assert sum(w == well for w, _ in files.tables) > 1
    parallel = ingest.read_well_table(files, well, geometry, PlateLayout())
    monkeypatch.setattr(ingest, "_READ_THREADS", 1)
    pd.testing.assert_frame_equal(parallel, ingest.read_well_table(files, well, geometry, PlateLayout()),
                                  check_exact=True)


@pytest.mark.slow
def test_real_plate(plate_3d_path, plate_3d_geometry):
    sdata = read_plate(plate_3d_path, **plate_3d_geometry)
    table = sdata.tables["nuclei_features"]
    counts = table.obs.groupby("well", observed=True).size().to_dict()
    assert counts == {"A06": 4959, "G04": 1420, "H03": 5568}
    assert len(table) == 11947
    assert sdata.images["IF_plate_3d_A06"].shape == (4, 52, 954, 954)
    assert (table.obs["instance_id"].to_numpy() == table.obs["label"].to_numpy()).all()
    sp = table.obsm["spatial"]
    # one unit (um) on every axis: xy span ~954 * 1.288 um, z span ~51 * 10 um
    assert 1000 < sp[:, 0].max() < 1230 and 300 < sp[:, 2].max() <= 510


def test_slice_measurements_match_regionprops():
    from skimage.measure import regionprops_table

    from phenocoder_lib.synthetic import slice_measurements

    rng = np.random.default_rng(0)
    labels = np.zeros((60, 70), np.int32)
    for lab in range(1, 9):
        y, x = rng.integers(5, 55), rng.integers(5, 65)
        labels[y - rng.integers(1, 5): y + rng.integers(1, 5), x - rng.integers(1, 6): x + rng.integers(1, 6)] = lab
    labels[labels == 4] = 0  # a missing id
    image = rng.integers(0, 255, size=(2, 60, 70)).astype(np.uint8)
    ours = slice_measurements(labels, image)
    ref = pd.DataFrame(regionprops_table(labels, intensity_image=np.moveaxis(image, 0, -1), properties=(
        "label", "centroid", "area", "eccentricity", "intensity_mean", "major_axis_length", "minor_axis_length")))
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_allclose(ours.to_numpy(float), ref.to_numpy(float), rtol=1e-6, atol=1e-6)
