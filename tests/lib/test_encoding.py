"""Encoding without TensorFlow: condition encoding, patch sources, normalization, table layout, message passing.

A stub model whose "latent" is the per-channel mean of the normalized patch makes every number here
checkable by hand (and keeps this file fast: no TensorFlow import).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib import patches as P
from phenocoder_lib.encoding import ConditionEncoder, UnseenConditionWarning, condition_frame, encode_table
from phenocoder_lib.ingest import read_plate
from phenocoder_lib.synthetic import make_synthetic_plate

# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


class _StubEncoder:
    def __init__(self, conditional: bool) -> None:
        self.calls = 0
        self.conditional = conditional

    def predict_on_batch(self, inputs):
        self.calls += 1
        x = inputs[0] if self.conditional else inputs
        z = x.mean(axis=(1, 2))  # (n, c): mean of each normalized channel
        if self.conditional:
            z = np.concatenate([z, inputs[1]], axis=1)
        return [z, np.zeros_like(z)]


class StubModel:
    """Duck-typed stand-in for a CVAE: ``n_latent_dim``, ``conditional``, ``encoder.predict_on_batch``."""

    def __init__(self, n_channels: int, n_conditions: int = 0) -> None:
        self.n_latent_dim = n_channels + n_conditions
        self.conditional = n_conditions > 0
        self.encoder = _StubEncoder(self.conditional)


@pytest.fixture(scope="module")
def plate_root(plate_template):
    return plate_template("small", "plate")


@pytest.fixture(scope="module")
def plate(plate_root):
    return read_plate(plate_root)


@pytest.fixture(scope="module")
def datasets(plate, plate_root, tmp_path_factory):
    """Dataset 'both' (both samples) and 'first' (only the first well) in one folder."""
    folder = tmp_path_factory.mktemp("datasets")
    samples = list(pd.unique(plate.tables["nuclei_features"].obs["sample"].astype(str)))
    common = dict(table_key="nuclei_features", sample_key="sample", image_key="IF", patch_size=16)
    both = P.generate_dataset(plate, dataset="both", dir_dataset=folder, **common)
    first_well = read_plate(plate_root, wells=[samples[0].split("_")[-1]])
    first = P.generate_dataset(first_well, dataset="first", dir_dataset=folder, **common)
    assert first.samples == samples[:1]
    return folder, both, first, samples


def _config(*datasets, encoder: ConditionEncoder | None = None) -> dict:
    return {
        "model_name": "stub",
        "dataset_settings": {ds.name: ds.settings for ds in datasets},
        "datasets": [ds.name for ds in datasets],
        "conditions": encoder.columns if encoder is not None else [],
        "conditions_encoder": encoder.to_dict() if encoder is not None else None,
    }


def _encode(model, sdata, config, **kw):
    return encode_table(model, sdata, model_config=config, table_key="nuclei_features", sample_key="sample",
                        image_key="IF", **kw)


# --------------------------------------------------------------------------------------------------
# ConditionEncoder
# --------------------------------------------------------------------------------------------------


def test_condition_encoder_one_hot_and_continuous():
    frame = pd.DataFrame({"dataset": ["a", "b", "a"], "z": [2, 10, 6], "donor": [1, 2, 3]})
    enc = ConditionEncoder.fit(frame, ["dataset", "z", "donor"])
    assert enc.kinds == {"dataset": "categorical", "z": "continuous", "donor": "categorical"}
    assert enc.feature_names == ["dataset=a", "dataset=b", "z", "donor=1", "donor=2", "donor=3"]
    x, report = enc.transform(frame)
    np.testing.assert_array_equal(x, np.array([
        [1, 0, 0.0, 1, 0, 0],
        [0, 1, 1.0, 0, 1, 0],
        [1, 0, 0.5, 0, 0, 1],
    ], np.float32))
    assert report == {}


def test_condition_encoder_unseen_category_is_all_zero_and_warned():
    enc = ConditionEncoder.fit(pd.DataFrame({"dataset": ["a", "b"], "z": [0, 4]}), ["dataset", "z"])
    new = pd.DataFrame({"dataset": ["c", "a", "c"], "z": [8, 2, -1]})
    with pytest.warns(UnseenConditionWarning, match=r"'c': 2.*all-zero.*2 values outside"):
        x, report = enc.transform(new, where=" of sample 'X'")
    np.testing.assert_array_equal(x[:, :2], [[0, 0], [1, 0], [0, 0]])
    np.testing.assert_allclose(x[:, 2], [1.0, 0.5, 0.0])  # clipped to the training range [0, 4]
    assert report == {"dataset": {"unseen": {"c": 2}}, "z": {"clipped": 2, "range": [0.0, 4.0]}}


def test_condition_encoder_json_round_trip_and_string_categories():
    # '01' vs 1: categories are compared as strings, integral floats as ints (no CSV-style drift).
    frame = pd.DataFrame({"plate": ["01", "02"], "row": [1.0, 2.0]})
    enc = ConditionEncoder.fit(frame, ["plate", "row"], continuous=[])
    again = ConditionEncoder.from_json(enc.to_json())
    assert again == enc
    assert enc.categories == {"plate": ["01", "02"], "row": ["1", "2"]}
    x, _ = again.transform(pd.DataFrame({"plate": ["02"], "row": [2]}))
    np.testing.assert_array_equal(x, [[0, 1, 0, 1]])


def test_condition_encoder_constant_continuous_column_is_zero():
    enc = ConditionEncoder.fit(pd.DataFrame({"z": [0, 0]}), ["z"])
    x, report = enc.transform(pd.DataFrame({"z": [0, 0]}))
    np.testing.assert_array_equal(x, [[0], [0]])
    assert report == {}


def test_condition_frame_unknown_column_names_the_fix(datasets):
    _, both, _, _ = datasets
    with pytest.raises(KeyError, match=r"unknown condition column 'donor'.*metadata_keys=\['donor'\]"):
        condition_frame(["donor"], index=both.index, sample_key="sample", obs=None)


def test_condition_frame_reads_obs_columns_by_object(datasets, plate):
    _, both, _, _ = datasets
    obs = plate.tables["nuclei_features"].obs
    frame = condition_frame(["well", "dataset", "z"], index=both.index, sample_key="sample", obs=obs)
    expected = obs["well"].reindex(both.index["obs_name"]).to_numpy()
    np.testing.assert_array_equal(frame["well"].to_numpy(), expected)
    assert set(frame["dataset"]) == {"both"}


# --------------------------------------------------------------------------------------------------
# encode_table with a stub model
# --------------------------------------------------------------------------------------------------


def _expected_means(ds, sample):
    """Per-channel means of the stored, normalized patches of ``sample``, in table order of obs names."""
    idx = ds.index[ds.index["sample"] == sample]
    x = ds.read(sample)  # store order
    means = x.mean(axis=(1, 2))
    return pd.DataFrame(means[idx["row"].to_numpy()], index=idx["obs_name"].to_numpy())


def test_every_object_gets_a_row_in_table_order(plate, datasets):
    _, both, _, samples = datasets
    table = plate.tables["nuclei_features"]
    out = _encode(StubModel(4), plate, _config(both), data_dir=datasets[0])
    assert out.n_obs == table.n_obs
    assert list(out.obs_names) == list(table.obs_names)
    assert list(out.var_names) == ["phc_latent_1", "phc_latent_2", "phc_latent_3", "phc_latent_4"]
    assert out.X.dtype == np.float32
    for col in table.obs.columns:
        pd.testing.assert_series_equal(out.obs[col], table.obs[col], check_categorical=False)
    assert set(out.obsm) == set(table.obsm)
    np.testing.assert_array_equal(out.obsm["spatial"], table.obsm["spatial"])
    # border objects are padded and flagged, never dropped
    assert out.obs["phc_padded"].sum() == both.index["padded"].sum() > 0
    for sample in samples:
        exp = _expected_means(both, sample)
        rows = out.obs["sample"].astype(str) == sample
        np.testing.assert_allclose(out.X[rows.to_numpy()], exp.loc[out.obs_names[rows]].to_numpy(), atol=1e-6)
        assert out.uns["phenocoder"]["samples"][sample]["patch_source"] == "dataset store"


def test_table_is_linked_to_the_labels(plate, datasets):
    from spatialdata.models import TableModel

    _, both, _, _ = datasets
    out = _encode(StubModel(4), plate, _config(both), data_dir=datasets[0])
    attrs = out.uns[TableModel.ATTRS_KEY]
    src = plate.tables["nuclei_features"].uns[TableModel.ATTRS_KEY]
    assert attrs["region_key"] == src["region_key"] and attrs["instance_key"] == src["instance_key"]
    assert sorted(np.atleast_1d(attrs["region"])) == sorted(np.atleast_1d(src["region"]))
    meta = out.uns["phenocoder"]
    assert meta["latent"] == "z_mean" and meta["patch_size"] == [16, 16]
    assert meta["normalization"] == {"scale": True, "scale_per_sample": True, "scale_percentile": 1.0}


def test_encoded_table_writes_to_zarr(plate, datasets, tmp_path):
    import spatialdata as sd

    _, both, _, _ = datasets
    out = _encode(StubModel(4), plate, _config(both), data_dir=datasets[0], spatial_message_passing_radius=10.0)
    sdata = sd.SpatialData(labels=dict(plate.labels), tables={"phenocoder": out})
    sdata.write(tmp_path / "out.zarr")
    back = sd.read_zarr(tmp_path / "out.zarr")
    np.testing.assert_array_equal(back.tables["phenocoder"].X, out.X)
    assert "spatial_message_passing" in back.tables["phenocoder"].layers


def test_images_and_store_give_the_same_latents(plate, datasets):
    _, both, _, _ = datasets
    a = _encode(StubModel(4), plate, _config(both), data_dir=datasets[0])
    b = _encode(StubModel(4), plate, _config(both), data_dir=datasets[0], use_store=False)
    assert {s["patch_source"] for s in b.uns["phenocoder"]["samples"].values()} == {"image"}
    np.testing.assert_allclose(a.X, b.X, atol=1e-6)
    np.testing.assert_array_equal(a.obs["phc_padded"], b.obs["phc_padded"])


def test_unseen_sample_gets_anchors_from_its_own_patches(plate, datasets):
    """A sample outside the training dataset is cut from the image and normalized with anchors computed
    from its own patches, exactly as if it had been in a dataset."""
    _, both, first, samples = datasets
    new = samples[1]
    assert new not in first.samples
    out = _encode(StubModel(4), plate, _config(first), data_dir=datasets[0])
    info = out.uns["phenocoder"]["samples"][new]
    assert info["patch_source"] == "image"
    assert info["anchor_source"] == "computed from the sample's own patches"
    assert info["anchors"] == both.settings["normalization"]["per_sample"][new]
    rows = (out.obs["sample"].astype(str) == new).to_numpy()
    exp = _expected_means(both, new)
    np.testing.assert_allclose(out.X[rows], exp.loc[out.obs_names[rows]].to_numpy(), atol=1e-6)


def test_unseen_dataset_category_encodes_as_zero(plate, datasets):
    _, _, first, samples = datasets
    frame = condition_frame(["dataset", "z"], index=first.index, sample_key="sample", obs=None)
    enc = ConditionEncoder.fit(frame, ["dataset", "z"])
    with pytest.warns(UnseenConditionWarning, match="not seen in training"):
        out = _encode(StubModel(4, enc.width), plate, _config(first, encoder=enc), data_dir=datasets[0])
    cond = out.X[:, 4:]  # the stub appends the condition vector to its latent
    seen = (out.obs["sample"].astype(str) == samples[0]).to_numpy()
    assert np.all(cond[seen, 0] == 1.0)
    assert np.all(cond[~seen, 0] == 0.0)  # dataset unknown for the new sample: all-zero one-hot
    report = out.uns["phenocoder"]["samples"][samples[1]]["unseen_conditions"]
    assert "<not in any training dataset>" in report


def test_encode_one_sample_streams_in_batches(plate, datasets):
    _, both, _, samples = datasets
    model = StubModel(4)
    out = _encode(model, plate, _config(both), data_dir=datasets[0], samples=[samples[0]], batch_size=7)
    n = int((plate.tables["nuclei_features"].obs["sample"].astype(str) == samples[0]).sum())
    assert out.n_obs == n
    assert model.encoder.calls == int(np.ceil(n / 7))


def test_unknown_sample_is_a_clear_error(plate, datasets):
    _, both, _, _ = datasets
    with pytest.raises(KeyError, match=r"samples=\['nope'\]"):
        _encode(StubModel(4), plate, _config(both), samples=["nope"])


# --------------------------------------------------------------------------------------------------
# Message passing
# --------------------------------------------------------------------------------------------------


def test_message_passing_layer_is_the_neighbourhood_mean(plate, datasets):
    _, both, _, _ = datasets
    radius = 15.0
    out = _encode(StubModel(4), plate, _config(both), data_dir=datasets[0], spatial_message_passing_radius=radius)
    layer = out.layers["spatial_message_passing"]
    coords = np.asarray(out.obsm["spatial"])
    samples = out.obs["sample"].astype(str).to_numpy()
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    adj = (d <= radius) & (samples[:, None] == samples[None])  # includes self
    expected = (adj.astype(np.float64) @ out.X.astype(np.float64)) / adj.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(layer, expected, rtol=1e-5, atol=1e-6)
    assert adj.sum() > 2 * len(adj)  # the radius does connect objects


def test_message_passing_tiny_hand_computed_case(monkeypatch):
    """Three objects on a line 1 um apart plus one far away, radius 1 (inclusive)."""
    import anndata as ad

    from phenocoder_lib import encoding as E

    obs = pd.DataFrame({"sample": ["s"] * 4}, index=["a", "b", "c", "d"])
    table = ad.AnnData(X=np.zeros((4, 1), np.float32), obs=obs)
    table.obsm["spatial"] = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 10.0]])
    latents = np.array([[1.0, 0.0], [2.0, 3.0], [4.0, 6.0], [8.0, 9.0]], np.float32)

    class FakeSdata:
        tables = {"t": table}

    def fake_encode_sample(model, sdata, sample, **kw):
        return {"rows": np.arange(4), "latents": latents, "padded": np.zeros(4, bool), "anchors": None,
                "anchor_source": "-", "patch_source": "-", "dataset": None, "conditions_report": {}}

    monkeypatch.setattr(E, "encode_sample", fake_encode_sample)
    settings = {"patch_size": [8, 8], "channels": ["c"], "spatial_key_index": "spatial_index",
                "normalization": {"scale": True, "scale_per_sample": True, "scale_percentile": 1.0}}
    model = StubModel(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = E.encode_table(model, FakeSdata(), model_config={"dataset_settings": {"d": settings}},
                             table_key="t", sample_key="sample", image_key="IF", spatial_message_passing_radius=1.0)
    expected = np.array([
        [(1 + 2) / 2, (0 + 3) / 2],  # a: a, b
        [(1 + 2 + 4) / 3, (0 + 3 + 6) / 3],  # b: a, b, c
        [(2 + 4) / 2, (3 + 6) / 2],  # c: b, c
        [8, 9],  # d: alone
    ])
    np.testing.assert_allclose(out.layers["spatial_message_passing"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out.X, latents)


def test_encode_table_gives_each_sample_its_rows_grouped_once(monkeypatch):
    """encode_table groups the table by sample in one pass (not one scan per sample) and passes each sample
    its rows, ascending, also when the samples' rows are interleaved; latents land in table order."""
    import anndata as ad

    from phenocoder_lib import encoding as E

    labels = np.array(["s2", "s0", "s2", "s1", "s0", "s2", "s1"])
    table = ad.AnnData(X=np.zeros((7, 1), np.float32), obs=pd.DataFrame({"sample": labels},
                                                                        index=[f"o{i}" for i in range(7)]))
    table.obsm["spatial"] = np.zeros((7, 2))
    seen = {}

    class FakeSdata:
        tables = {"t": table}

    def fake_encode_sample(model, sdata, sample, *, rows, **kw):
        seen[sample] = rows
        return {"rows": rows, "latents": rows[:, None].astype(np.float32) * [1, 1], "padded": np.zeros(len(rows), bool),
                "anchors": None, "anchor_source": "-", "patch_source": "-", "dataset": None, "conditions_report": {}}

    monkeypatch.setattr(E, "encode_sample", fake_encode_sample)
    settings = {"patch_size": [8, 8], "channels": ["c"], "spatial_key_index": "spatial_index",
                "normalization": {"scale": True, "scale_per_sample": True, "scale_percentile": 1.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = E.encode_table(StubModel(2), FakeSdata(), model_config={"dataset_settings": {"d": settings}},
                             table_key="t", sample_key="sample", image_key="IF")
    assert list(seen) == ["s2", "s0", "s1"]
    for sample, rows in seen.items():
        np.testing.assert_array_equal(rows, np.flatnonzero(labels == sample))
    np.testing.assert_array_equal(out.X[:, 0], np.arange(7))


def test_negative_radius_is_rejected(plate, datasets):
    _, both, _, _ = datasets
    with pytest.raises(ValueError, match="spatial_message_passing_radius=-1"):
        _encode(StubModel(4), plate, _config(both), spatial_message_passing_radius=-1)


def test_two_dimensional_plate_from_images_and_store(tmp_path):
    make_synthetic_plate(tmp_path / "p2", n_wells=1, ndim=2, image_size=64, nuclei_per_well=12, seed=4)
    sdata = read_plate(tmp_path / "p2")
    ds = P.generate_dataset(sdata, dataset="flat", dir_dataset=tmp_path / "d", table_key="nuclei_features",
                            sample_key="sample", image_key="IF", patch_size=(10, 14))
    a = _encode(StubModel(4), sdata, _config(ds), data_dir=tmp_path / "d", batch_size=5)
    b = _encode(StubModel(4), sdata, _config(ds), use_store=False, batch_size=5)
    assert a.n_obs == sdata.tables["nuclei_features"].n_obs
    np.testing.assert_allclose(a.X, b.X, atol=1e-6)
    exp = _expected_means(ds, ds.samples[0])
    np.testing.assert_allclose(a.X, exp.loc[a.obs_names].to_numpy(), atol=1e-6)
