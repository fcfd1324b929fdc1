"""Steps 2-4 through the facade on a small synthetic plate: CVAE and CondCVAE end to end, errors first."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

from phenocoder_lib import Phenocoder
from phenocoder_lib.encoding import UnseenConditionWarning
from phenocoder_lib.ingest import read_plate

PATCH = 16
ARCH = dict(input_shape=(PATCH, PATCH, 4), conv_layers=(8, 16), batch_size=32)


@pytest.fixture(scope="module")
def plate_root(plate_template):
    return plate_template("model", "plate")


@pytest.fixture(scope="module")
def plain(trained_cvae):
    """The session's trained plain CVAE (tests/conftest.py) loaded into a fresh facade, and its training history."""
    p = Phenocoder(sdata=read_plate(trained_cvae.plate_root))
    p.load_model(trained_cvae.model_dir)
    return p, trained_cvae.history


# --------------------------------------------------------------------------------------------------
# Errors before any training
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def untrained(plate_root, tmp_path_factory):
    """A facade with a dataset and no model (initialize_model must fail before building anything)."""
    p = Phenocoder(sdata=read_plate(plate_root))
    p.generate_dataset("d", tmp_path_factory.mktemp("errors"), patch_size=PATCH, progress=False)
    return p


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"input_shape": (32, 32, 4)}, ValueError, r"patch_size=\(16, 16\); pass input_shape=\(16, 16, 4\)"),
        ({"input_shape": (16, 16, 3)}, ValueError, r"has 3 channels but the datasets have 4"),
        ({"conv_layers": (8, 16, 32, 64, 128)}, ValueError, r"divisible by 2\*\*len\(conv_layers\) = 32"),
        ({"conditions": ["donor"]}, KeyError, r"unknown condition column 'donor'"),
        ({"conditions": "dataset"}, TypeError, r"must be a list of column names"),
        ({"batch_size": 0}, ValueError, r"batch_size=0"),
        ({"validation_fraction": 1.0}, ValueError, r"validation_fraction=1.0"),
    ],
)
def test_shape_and_condition_errors_are_raised_before_training(untrained, kwargs, exc, message):
    p = untrained
    args = dict(n_latent_dim=4, n_dense_dim=8, conditions=[], **ARCH)
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        p.initialize_model(**args)
    assert p.model is None and not (p.data_dir / "models").exists()


def test_steps_need_their_inputs():
    p = Phenocoder()
    with pytest.raises(ValueError, match="generate_dataset"):
        p.initialize_model(4, 8, [], **ARCH)
    with pytest.raises(ValueError, match="initialize_model"):
        p.train()
    with pytest.raises(ValueError, match="initialize_model"):
        p.encode()


# --------------------------------------------------------------------------------------------------
# Plain CVAE
# --------------------------------------------------------------------------------------------------


def test_plain_cvae_trains_and_writes_its_files(plain):
    p, history = plain
    assert type(p.model).__name__ == "CVAE"
    for key in ("loss", "reconstruction_loss", "kl_loss", "val_loss", "val_reconstruction_loss", "val_kl_loss",
                "learning_rate", "epoch_seconds", "train_patches_per_s"):
        assert len(history[key]) == 2, key
    assert history["learning_rate"] == pytest.approx([1e-3, 1e-3])
    assert all(np.isfinite(history["val_loss"]))
    files = {f.name for f in p.model_dir.iterdir()}
    assert {"model.keras", "checkpoint.keras", "model_config.json", "history.json", "history.csv",
            "history.png", "reconstructions.png", "latent_space.png"} <= files
    assert json.loads((p.model_dir / "history.json").read_text())["val_loss"] == history["val_loss"]
    events = list(p.dir_tensorboard.rglob("events.out.tfevents.*"))
    assert {e.parent.name for e in events} >= {"train", "validation"}
    assert p.dir_tensorboard.parent.name == "tensorboard_logs"


def test_model_config_records_every_parameter(plain):
    p, _ = plain
    config = json.loads((p.model_dir / "model_config.json").read_text())
    assert re.fullmatch(r"latent_4_dense_16_dropout_0.25_beta_0.01_seed_0_[0-9a-f]{8}", config["model_name"])
    assert p.model_dir.name == config["model_name"]
    expected = {"n_latent_dim": 4, "n_dense_dim": 16, "conditions": [], "dropout": 0.25, "batch_size": 32,
                "n_workers": 1, "input_shape": [16, 16, 4], "conv_layers": [8, 16], "beta": 0.01, "flip": True,
                "shuffle": True, "validation_fraction": 0.2, "seed": 0, "datasets": ["d1"]}
    assert {k: config[k] for k in expected} == expected
    assert config["dataset_settings"]["d1"]["normalization"]["per_sample"]  # anchors travel with the model
    assert config["split"]["n_train"] + config["split"]["n_val"] == 120 and config["split"]["n_val"] == 24
    assert config["training"]["epochs_run"] == 2 and config["training"]["best_epoch"] in (1, 2)


def test_encode_every_object_deterministically(plain):
    p, _ = plain
    table = p.sdata.tables["nuclei_features"]
    first = p.encode(progress=False)
    assert p.sdata.tables["phenocoder"] is first
    assert first.n_obs == table.n_obs and list(first.obs_names) == list(table.obs_names)
    assert first.obs["phc_padded"].sum() > 0  # border objects are padded, not dropped
    second = p.encode(progress=False, use_store=False)
    np.testing.assert_allclose(second.X, first.X, atol=1e-5)
    third = p.encode(progress=False)
    np.testing.assert_array_equal(third.X, first.X)  # z_mean: identical every time


def test_encode_latents_are_z_mean_of_the_stored_patches(plain):
    p, _ = plain
    out = p.encode(progress=False, batch_size=7)
    ds = p.open_datasets()[0]
    sample = ds.samples[0]
    idx = ds.index[ds.index["sample"] == sample]
    x = ds.read(sample)[idx["row"].to_numpy()]
    z_mean = np.asarray(p.model.encoder.predict(x, verbose=0)[0])
    np.testing.assert_allclose(out[idx["obs_name"].to_numpy()].X, z_mean, atol=1e-5)


def test_encode_with_message_passing(plain):
    p, _ = plain
    out = p.encode(progress=False, spatial_message_passing_radius=20.0)
    layer = out.layers["spatial_message_passing"]
    coords = np.asarray(out.obsm["spatial"])
    samples = out.obs["sample"].astype(str).to_numpy()
    i = int(np.argmax([(np.linalg.norm(coords - c, axis=1) <= 20).sum() for c in coords]))
    nb = (np.linalg.norm(coords - coords[i], axis=1) <= 20.0) & (samples == samples[i])
    assert nb.sum() >= 2
    np.testing.assert_allclose(layer[i], out.X[nb].mean(axis=0), rtol=1e-5, atol=1e-6)
    assert out.uns["phenocoder"]["spatial_message_passing_radius"] == 20.0


@pytest.mark.parametrize(
    ("kwargs", "stored"),
    [({"scale_per_sample": False}, "scale_per_sample=True"), ({"scale_percentile": 2}, "scale_percentile=1.0"),
     ({"scale": False}, "scale=True"), ({"spatial_key_index": "spatial"}, "spatial_key_index='spatial_index'")],
)
def test_encode_arguments_must_match_the_stored_normalization(plain, kwargs, stored):
    p, _ = plain
    with pytest.raises(ValueError, match=re.escape(f"made with {stored}")):
        p.encode(progress=False, **kwargs)
    p.encode(progress=False, scale=True, scale_per_sample=True, scale_percentile=1, spatial_key_index="spatial_index",
             samples=[p.datasets and p.open_datasets()[0].samples[0]])


def test_summarize_model(plain, capsys):
    p, _ = plain
    text = p.summarize_model()
    assert "conv_layers: [8, 16]" in text and "decoder_deconv_1_8" in text
    assert "encoder_conv_2_16" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# CondCVAE, unseen sample and unseen categories
# --------------------------------------------------------------------------------------------------


def test_cond_cvae_end_to_end_with_an_unseen_sample(plate_root, tmp_path):
    one_well = read_plate(plate_root, wells=["A01"])
    p = Phenocoder(sdata=one_well, seed=1)
    p.generate_dataset("first", tmp_path, patch_size=PATCH, progress=False)
    p.initialize_model(4, 16, ["dataset", "z", "well"], **ARCH)
    assert type(p.model).__name__ == "CondCVAE"
    enc = p.model_oh_enc
    assert enc.kinds == {"dataset": "categorical", "z": "continuous", "well": "categorical"}
    assert p.model.n_conditions == 1 + 1 + 1 == p.model_config["conditions_dim"]
    seen = []
    history = p.train(n_epochs=1, verbose=0, plot=False, on_epoch_end=lambda epoch, m: seen.append((epoch, m)))
    assert len(history["val_loss"]) == 1 and p.model_name.startswith("cond_latent_4")
    assert [e for e, _ in seen] == [1]  # called live, once per epoch, with that epoch's metrics
    assert seen[0][1]["val_loss"] == pytest.approx(history["val_loss"][0])
    assert {"loss", "kl_loss", "learning_rate"} <= set(seen[0][1])
    config = json.loads((p.model_dir / "model_config.json").read_text())
    assert config["conditions_encoder"]["categories"] == {"dataset": ["first"], "well": ["A01"]}

    full = read_plate(plate_root)  # a second well the model never saw
    p.add_sdata(full)
    with pytest.warns(UnseenConditionWarning) as record:
        out = p.encode(progress=False)
    message = " ".join(str(w.message) for w in record)
    assert "'A02': 60" in message and "all-zero" in message
    assert out.n_obs == full.tables["nuclei_features"].n_obs
    info = out.uns["phenocoder"]["samples"]
    new = [s for s in info if s.endswith("A02")][0]
    assert info[new]["patch_source"] == "image"
    assert info[new]["anchor_source"] == "computed from the sample's own patches"
    assert np.isfinite(out.X).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnseenConditionWarning)
        again = p.encode(progress=False)
    np.testing.assert_array_equal(again.X, out.X)
