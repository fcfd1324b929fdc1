"""generate_dataset works sample by sample: same results per well and for the whole plate, and a
footprint that grows with the plate only by its returned index."""

from __future__ import annotations

import gc
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import patches as P
from phenocoder_lib.ingest import read_plate, scan_plate
from phenocoder_lib.patches import IntensityAccumulator, generate_dataset, patch_windows

KEYS = dict(table_key="nuclei_features", sample_key="sample", image_key="IF")


@pytest.fixture(scope="module")
def sdata3d(synthetic_plate_3d):
    return read_plate(synthetic_plate_3d)


# ---- the same results, however the plate is cut ------------------------------------------------------


def test_per_well_generation_equals_whole_plate(synthetic_plate_3d, sdata3d, tmp_path, folder_digest):
    """As the Dagster ``patches`` asset runs it (one well's SpatialData a call) or on the whole plate."""
    kw = dict(dataset="d", patch_size=(9, 12), metadata_keys=["well", "n_slices"], **KEYS)
    whole = generate_dataset(sdata3d, dir_dataset=tmp_path / "whole", **kw)
    wells = scan_plate(synthetic_plate_3d).wells
    assert len(wells) == len(whole.samples) == 3
    stats = whole.stats()
    for well in wells:
        one = generate_dataset(read_plate(synthetic_plate_3d, wells=[well]), dir_dataset=tmp_path / well, **kw)
        (sample,) = one.samples
        expected = whole.index[whole.index["sample"] == sample].reset_index(drop=True)
        pd.testing.assert_frame_equal(one.index, expected, check_exact=True)
        assert folder_digest(one.path / P.STORE_DIR / sample) == folder_digest(whole.path / P.STORE_DIR / sample)
        pd.testing.assert_frame_equal(one.stats(), stats[stats["sample_id"] == sample].reset_index(drop=True))
        assert one.settings["normalization"]["per_sample"][sample] == whole.settings["normalization"]["per_sample"][
            sample]


def test_index_is_the_table_grouped_by_sample(sdata3d, tmp_path):
    """The index, computed from the table alone: samples in order of first appearance, each sample's
    objects in table order, store rows in z-plane order, border flags from the geometry."""
    h, w = 16, 16
    ds = generate_dataset(sdata3d, dataset="d1", dir_dataset=tmp_path, patch_size=(h, w), metadata_keys=["well"],
                          **KEYS)
    table = sdata3d.tables["nuclei_features"]
    names = table.obs["sample"].astype(str).to_numpy()
    samples = list(pd.unique(names))
    assert ds.samples == samples
    parts = []
    for s in samples:
        rows = np.flatnonzero(names == s)
        y, x, z = np.asarray(table.obsm["spatial_index"])[rows].T
        _, _, height, width = sdata3d.images[f"IF_{s}"].shape
        store_row = np.empty(len(rows), np.int64)
        store_row[np.argsort(z, kind="stable")] = np.arange(len(rows))
        parts.append(pd.DataFrame({
            "obs_name": table.obs_names[rows].astype(str), "sample": s, "y": y, "x": x, "z": z, "row": store_row,
            "padded": (y - h // 2 < 0) | (x - w // 2 < 0) | (y - h // 2 + h > height) | (x - w // 2 + w > width),
            "dataset": "d1", "well": table.obs["well"].to_numpy()[rows],
        }))
    expected = pd.concat(parts, ignore_index=True)
    pd.testing.assert_frame_equal(ds.index, expected, check_exact=True)
    assert ds.settings["n_patches"] == len(expected) and ds.settings["n_padded"] == int(expected["padded"].sum())


def test_seeded_subsets_follow_the_documented_draw(sdata3d, tmp_path):
    """n_samples drawn from the samples in order of appearance, then n_patches from their rows (one rng)."""
    ds = generate_dataset(sdata3d, dataset="d1", dir_dataset=tmp_path, patch_size=16, n_samples=2, n_patches=50,
                          seed=7, **KEYS)
    table = sdata3d.tables["nuclei_features"]
    names = table.obs["sample"].astype(str).to_numpy()
    samples = list(pd.unique(names))
    rng = np.random.default_rng(7)
    chosen = sorted(rng.choice(samples, size=2, replace=False).tolist(), key=samples.index)
    selected = np.sort(rng.choice(np.flatnonzero(np.isin(names, chosen)), size=50, replace=False))
    assert ds.samples == [s for s in chosen if (names[selected] == s).any()]
    expected = [n for s in ds.samples for n in table.obs_names[selected[names[selected] == s]]]
    assert ds.index["obs_name"].tolist() == expected


def test_sample_ids_are_grouped_as_their_strings():
    """``1`` and ``"1"`` are one sample, as ``astype(str)`` makes them; order of first appearance, not of categories."""
    names, groups = P._sample_rows(pd.Series([1, "1", "b", 2, "b", 1], dtype=object))
    assert names == ["1", "b", "2"]
    assert [g.tolist() for g in groups] == [[0, 1, 5], [2, 4], [3]]
    names, groups = P._sample_rows(pd.Series(pd.Categorical(["b", "a", "b"], categories=["a", "b"])))
    assert names == ["b", "a"] and [g.tolist() for g in groups] == [[0, 2], [1]]


def test_index_writer_writes_the_file_to_parquet_writes(tmp_path, monkeypatch):
    """Per-sample frames give the bytes of one ``to_parquet`` of their concatenation, row groups included, even
    when a sample's own values of an object column infer another type (all missing: null)."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(P, "_ROW_GROUP", 7)
    frames = [pd.DataFrame({
        "obs_name": [f"s{i}_{k}" for k in range(n)], "sample": f"s{i}", "y": np.arange(n),
        "padded": np.arange(n) % 3 == 0, "dataset": "d",
        "tag": np.array([None if i == 0 else f"t{k % 2}" for k in range(n)], dtype=object),
    }) for i, n in enumerate([5, 12, 1, 9])]
    full = pd.concat(frames, ignore_index=True)
    full.to_parquet(tmp_path / "ref.parquet", index=False, row_group_size=7)
    bounds = np.cumsum([0] + [len(f) for f in frames])
    groups = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    with P._IndexWriter(tmp_path / "new.parquet", {"tag": P._arrow_type(full["tag"].to_numpy(), groups)}) as writer:
        for frame in frames:
            writer.append(frame)
            assert writer.buffered < 7  # at most one row group is held
    assert (tmp_path / "new.parquet").read_bytes() == (tmp_path / "ref.parquet").read_bytes()
    assert pq.ParquetFile(tmp_path / "new.parquet").num_row_groups == 4


def test_index_is_read_back_as_read_parquet_reads_it(sdata3d, tmp_path, monkeypatch):
    """PatchDataset.open decodes the index in batches into its columns: the DataFrame of ``pd.read_parquet``,
    also when missing values change a column's dtype between batches, and for files it leaves to pandas."""
    ds = generate_dataset(sdata3d, dataset="d1", dir_dataset=tmp_path, patch_size=8, metadata_keys=["well"], **KEYS)
    path = ds.path / P.INDEX_FILE
    monkeypatch.setattr(P, "_READ_ROWS", 7)
    frames = {"index": path}
    with_missing = pd.DataFrame({
        "i": np.array([1, 2, 3, None, 5, 6, 7, 8], dtype=object), "f": [1.0, 2, 3, 4, np.nan, 6, 7, 8],
        "s": ["a", "b", None, "d", "e", "f", "g", "h"], "t": pd.date_range("2020", periods=8, tz="UTC"),
        "n": np.arange(8), "b": np.arange(8) % 2 == 0,
    })
    for name, frame, index in [("missing", with_missing, False), ("head", with_missing[["n", "b"]], False),
                               ("empty", with_missing.iloc[:0], False), ("stored_index", with_missing, None)]:
        frames[name] = tmp_path / f"{name}.parquet"
        frame.to_parquet(frames[name], index=index)
    for name, file in frames.items():
        expected, got = pd.read_parquet(file), P._read_parquet(file)
        pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=name)
        pd.testing.assert_index_equal(got.index, expected.index, exact=True)


def test_blocked_gather_and_histograms_give_the_same_results(monkeypatch):
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 256, size=(3, 40, 50)).astype(np.uint8)
    ys, xs = rng.integers(0, 40, 57), rng.integers(0, 50, 57)
    ref, ref_pad = patch_windows(plane, ys, xs, (7, 6))
    whole = IntensityAccumulator(3, np.uint8)
    whole.add(ref)
    monkeypatch.setattr(P, "_GATHER_BYTES", 1)  # one window a block
    monkeypatch.setattr(P, "_HIST_ROWS", 5)
    blocked, pad = patch_windows(plane, ys, xs, (7, 6))
    np.testing.assert_array_equal(blocked, ref)
    np.testing.assert_array_equal(pad, ref_pad)
    acc = IntensityAccumulator(3, np.uint8)
    acc.add(blocked)
    assert acc.count == whole.count
    for c in range(3):
        np.testing.assert_array_equal(acc.hist[c], whole.hist[c])


def test_float_reservoirs_keep_the_image_dtype_and_the_same_statistics():
    rng = np.random.default_rng(1)
    patches = rng.random((300, 30, 30, 2)).astype(np.float32)  # 270,000 pixels a channel: a real draw
    narrow, wide = IntensityAccumulator(2, np.float32, seed=3), IntensityAccumulator(2, np.float64, seed=3)
    narrow.add(patches)
    wide.add(patches.astype(np.float64))
    assert narrow.samples[0][0].dtype == np.float32 and len(narrow.samples[0][0]) == P._RESERVOIR
    for c in range(2):
        assert narrow.stats(c, 1.0) == wide.stats(c, 1.0)


# ---- memory ------------------------------------------------------------------------------------------


def _tiny_plate(n_wells: int, per_well: int, size: int = 48):
    """Wells of many objects on tiny images: the per-object costs dominate one well's image and patches."""
    import anndata as ad
    import spatialdata as sd
    from spatialdata.models import Image2DModel

    rng = np.random.default_rng(0)
    images, obs = {}, []
    for w in range(n_wells):
        well = f"W{w:02d}"
        images[f"IF_{well}"] = Image2DModel.parse(rng.integers(0, 255, (2, size, size), dtype=np.uint8),
                                                  dims=("c", "y", "x"), c_coords=["a", "b"])
        obs.append(pd.DataFrame({"sample": well, "cond": "x" if w % 2 else "y"},
                                index=[f"{well}_{i}" for i in range(per_well)]))
    obs = pd.concat(obs).astype("category")
    table = ad.AnnData(obs=obs, obsm={"spatial_index": rng.integers(0, size, (n_wells * per_well, 2))})
    return sd.SpatialData(images=images, tables={"nuclei_features": table})


def _index_bytes(index: pd.DataFrame) -> int:
    """Bytes of the returned index: its arrays and each distinct Python object once."""
    total = 0
    for column in index.columns:
        values = index[column].to_numpy()
        total += values.nbytes
        if values.dtype == object:
            total += sum(sys.getsizeof(v) for v in {id(v): v for v in values}.values())
    return total


def test_peak_memory_grows_only_by_the_returned_index(tmp_path):
    """Peak traced memory (tracemalloc: Python objects and numpy arrays) of generate_dataset on 2 and 8 wells
    of 20,000 objects: it grows by at most 200 bytes an object, and by at most 40 bytes an object beyond the
    index it returns (measured: 138 and 16; the earlier whole-plate code: 305 and 182)."""
    kw = dict(dataset="d", dir_dataset=tmp_path, patch_size=(2, 2), metadata_keys=["cond"], **KEYS)
    generate_dataset(_tiny_plate(1, 100), **kw)  # imports and first-call caches, untraced
    peak, index_bytes, n = {}, {}, {}
    for wells in (2, 8):
        sdata = _tiny_plate(wells, 20_000)
        n[wells] = sdata.tables["nuclei_features"].n_obs
        gc.collect()
        tracemalloc.start()
        try:
            ds = generate_dataset(sdata, **kw)
            peak[wells] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(ds.index) == n[wells]
        index_bytes[wells] = _index_bytes(ds.index)
        del ds, sdata
    d_objects = n[8] - n[2]
    per_object = (peak[8] - peak[2]) / d_objects
    beyond_index = per_object - (index_bytes[8] - index_bytes[2]) / d_objects
    assert per_object <= 200, per_object
    assert beyond_index <= 40, beyond_index
