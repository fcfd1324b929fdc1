"""The library side of the per-well assets (``phenocoder_lib.pipeline``'s per-well stages), without Dagster runs."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import pipeline


def test_digests_are_the_ones_the_assets_record():
    from phenocoder_assets.assets._common import array_digest, digest

    expected = hashlib.sha256(json.dumps([{"a": 2, "b": 1}], separators=(",", ":")).encode()).hexdigest()[:24]
    assert pipeline.content_digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1}) == expected
    a = np.arange(4, dtype=np.int32)
    assert pipeline.array_digest([a]) == array_digest([a]) != pipeline.array_digest([a.astype(np.int64)])
    assert pipeline.array_digest([np.array(["x", 1], dtype=object)]) == pipeline.array_digest([np.array(["x", "1"])])


def test_file_digest_changes_with_the_bytes(tmp_path):
    path = tmp_path / "layout.csv"
    assert pipeline.file_digest(path) == "absent"
    path.write_text("well,treatment\n")
    first = pipeline.file_digest(path)
    path.write_text("well,treatment\nA01,x\n")
    assert first != pipeline.file_digest(path) != "absent" and len(first) == 24


def test_cluster_column_is_the_one_label_column():
    labels = pd.DataFrame({"obs_name": ["a"], "leiden": ["0"], "leiden_confidence": [1.0]})
    assert pipeline.cluster_column(labels) == "leiden"
    with pytest.raises(ValueError, match=r"no label column \(columns \['obs_name', 'x_confidence'\]\)"):
        pipeline.cluster_column(pd.DataFrame({"obs_name": ["a"], "x_confidence": [1.0]}))


def test_object_label_ids_parse_sample_prefixed_names():
    ok, ids = pipeline.object_label_ids(["P_A01_3", "P_A01_x", "P_A02_4", "P_A01_12"], "P_A01")
    assert ok.tolist() == [True, True, False, True]
    assert ids[0] == 3 and np.isnan(ids[1]) and ids[2] == 12


def _interactions(values: np.ndarray, cats=("a", "b"), radius="25") -> ad.AnnData:
    names = [f"radius:{radius}_stat:interactions_enrichment_zscore_{x}_{y}" for x in cats for y in cats]
    return ad.AnnData(np.asarray(values, dtype=np.float32), var=pd.DataFrame(index=names))


def test_interaction_matrix_averages_the_rows_and_keeps_absent_pairs_nan():
    stats = _interactions([[1, 2, np.nan, 4], [3, np.inf, np.nan, 6]])
    m = pipeline.interaction_matrix(stats, ["a", "b"], 25.0)
    assert m.shape == (2, 2)
    np.testing.assert_allclose(m[0], [2.0, 2.0])
    assert np.isnan(m[1, 0]) and m[1, 1] == 5.0
    assert pipeline.interaction_matrix(stats, ["a", "b"], 50.0) is None  # no columns at that radius
    assert pipeline.interaction_matrix(stats[:0], ["a", "b"], 25.0) is None  # no row
    np.testing.assert_allclose(pipeline.interaction_matrix(stats[:1], ["a", "b"], 25.0)[0], [1.0, 2.0])


def test_well_colours_treatments_then_plates(tmp_path):
    plate = tmp_path / "P"
    (plate / "ground_truth").mkdir(parents=True)
    pd.DataFrame({"well": ["A01", "A02"], "treatment": ["dmso", "drug"]}).to_csv(plate / "ground_truth" / "wells.csv",
                                                                                 index=False)
    obs = pd.DataFrame({"plate": ["P", "P"]}, index=["P_A01", "P_A02"])
    summaries = {"P_A01": {"plate_dir": str(plate), "well": "A01"}, "P_A02": {"plate_dir": str(plate), "well": "A02"}}
    assert pipeline.well_colours(obs, summaries) == (["dmso", "drug"], "treatment")
    assert pipeline.well_colours(obs, {"P_A01": summaries["P_A01"]}) == (["P", "P"], "plate")  # one well unknown
    assert pipeline.well_colours(obs.assign(treatment=["t1", "t2"]), {}) == (["t1", "t2"], "treatment")
    assert pipeline.well_colours(obs.drop(columns="plate"), {}) == (None, "well")


def test_planted_truth_objects_reads_label_ids_and_clusters(tmp_path):
    path = tmp_path / "labels.parquet"
    pd.DataFrame({"obs_name": ["S_1", "S_2", "T_3"], "leiden": ["0", "1", "1"],
                  "leiden_confidence": [1.0, 0.5, 1.0]}).to_parquet(path)
    objects = pipeline.planted_truth_objects({"S": path})
    assert objects.to_dict("list") == {"sample": ["S", "S"], "label": [1.0, 2.0], "cluster": ["0", "1"]}
    assert pipeline.planted_truth_objects({}) is None


def test_profiles_without_a_layout_are_not_scored():
    frames = {"latents": pd.DataFrame({"latent:0": [0.1, 0.2], "n_objects": [3, 4]}, index=["S1", "S2"])}
    info = pd.DataFrame({"sample": ["S1", "S2"], "plate": ["P", "P"], "well": ["A01", "A02"], "plate_dir": ["", ""]})
    scores, messages = pipeline.score_profiles(frames, info)
    assert scores is None and messages == ["no layout.csv beside the plate exports: the profiles are not scored"]
    profiled = pipeline.ProfiledWells(frames=frames, samples=["S1", "S2", "S3"], sample_info=info, scores=None,
                                      layout_digests={}, messages=messages, seconds={})
    assert profiled.missing == ["S3"] and profiled.finite and profiled.metrics() == {}
    profiled.scores = {"representations": {"latents": {"map_activity": 0.5, "map_consistency": float("nan")}}}
    assert profiled.metrics() == {"latents/map_activity": 0.5}


def _latents(tmp_path, sample: str, centers: np.ndarray, model: str = "m/1", seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + 0.05 * rng.standard_normal((20, centers.shape[1])) for c in centers]).astype(np.float32)
    obs = pd.DataFrame({"sample": sample}, index=[f"{sample}_{i + 1}" for i in range(len(x))])
    table = ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"phc_latent_{i}" for i in range(x.shape[1])]))
    table.obsm["spatial"] = rng.uniform(0, 100, (len(x), 2))
    table.uns["phenocoder_latents"] = {"model": model, "sample_key": "sample"}
    path = tmp_path / f"{sample}.h5ad"
    table.write_h5ad(path)
    return path


def test_reference_pooled_labels_transfer_and_model_check(tmp_path):
    centers = np.array([[0, 0, 0, 0], [5, 5, 5, 5]], dtype=float)
    files = {s: _latents(tmp_path, s, centers, seed=i) for i, s in enumerate(["P_A01", "P_A02"])}
    built = pipeline.build_cluster_reference(files, tmp_path / "ref", n_pcs=2, n_neighbors=5, resolution=0.1,
                                             knn="exact", seed=0)
    assert (tmp_path / "ref" / pipeline.REFERENCE_FILE).is_file()
    assert built.info["id"] == built.version[:12] and built.info["samples"] == ["P_A01", "P_A02"]
    assert sum(built.cluster_sizes.values()) == built.info["n_objects"] == 80
    blob = {f"{s}_{i + 1}": i // 20 for s in files for i in range(40)}  # objects 1-20: first blob, 21-40: second
    by_blob = built.labels.assign(blob=built.labels["obs_name"].map(blob)).groupby("blob")["label"]
    first, second = (set(v.astype(str)) for _, v in by_blob)
    assert first and second and not first & second  # no cluster mixes the two well separated blobs
    again = pipeline.build_cluster_reference(files, tmp_path / "ref2", n_pcs=2, n_neighbors=5, resolution=0.1,
                                             knn="exact", seed=0)
    assert again.version == built.version  # a content digest, not a random id

    pooled = pipeline.label_well(files["P_A01"], tmp_path / "ref", tmp_path / "a01.parquet", sample="P_A01",
                                 reference_info=built.info)
    assert pooled.source == "pooled" and pooled.mean_confidence == 1.0 and pooled.coords.shape == (40, 2)
    written = pd.read_parquet(tmp_path / "a01.parquet")
    assert list(written.columns) == ["obs_name", "leiden", "leiden_confidence"]
    new = _latents(tmp_path, "Q_A01", centers, seed=7)
    transferred = pipeline.label_well(new, tmp_path / "ref", tmp_path / "q.parquet", sample="Q_A01",
                                      reference_info=built.info, key_added="cluster")
    assert transferred.source == "transfer" and transferred.key == "cluster"
    votes = transferred.labels["cluster"].astype(str).to_numpy()
    assert set(votes[:20]) <= first and set(votes[20:]) <= second
    other = _latents(tmp_path, "R_A01", centers, model="m/2")
    with pytest.raises(ValueError, match=r"come from model 'm/2' but the cluster reference was built on 'm/1'"):
        pipeline.label_well(other, tmp_path / "ref", tmp_path / "r.parquet", sample="R_A01",
                            reference_info=built.info)
    mixed = {"P_A01": files["P_A01"], "R_A01": other}
    with pytest.raises(ValueError, match=r"different models \['m/1', 'm/2'\]"):
        pipeline.build_cluster_reference(mixed, tmp_path / "ref3", n_pcs=2, knn="exact")


def test_the_wells_thumbnail_is_drawn_from_the_written_store(tmp_path, tiny_plate_template):
    """``ingest_and_preview`` (the ``sdata`` well, in the step or a worker) reads its thumbnail back from the store
    it wrote: the same picture as from the source files, and a store to read it from."""
    from phenocoder_assets.ingest_worker import ingest_and_preview
    from phenocoder_assets.previews import well_thumbnail
    from phenocoder_lib.ingest import PlateLayout, read_plate

    read = dict(pixel_size_um=None, z_step_um=None, table_scale=None, image_key="DAPI", table_key="cells",
                sample_key="sample")
    done = ingest_and_preview(plate_dir=tiny_plate_template, sdata_file=tmp_path / "w" / "sdata.zarr", plate="TINY",
                              well="A01", layout=PlateLayout(), source_digest="d1", preview=True, read=read)
    assert done.summary["sample"] == "TINY_A01" and done.summary["source_digest"] == "d1"
    assert (done.sdata_file / "zarr.json").is_file() and {"read", "write", "preview"} <= set(done.seconds)
    source = read_plate(tiny_plate_template, wells=["A01"], plate="TINY", image_key="DAPI").images["DAPI_TINY_A01"]
    assert done.png == well_thumbnail(source, "TINY_A01")
    plain = ingest_and_preview(plate_dir=tiny_plate_template, sdata_file=tmp_path / "v" / "sdata.zarr", plate="TINY",
                               well="A02", layout=PlateLayout(), source_digest=None, preview=False, read=read)
    assert plain.png is None and "preview" not in plain.seconds
    from types import SimpleNamespace

    from phenocoder_assets.ingest_worker import _written_image

    written = _written_image(done.sdata_file, SimpleNamespace(summary=done.summary, image=None))
    assert written is not None and written.shape == source.shape  # read back from the store, not the source
    np.testing.assert_array_equal(np.asarray(written), np.asarray(source))
