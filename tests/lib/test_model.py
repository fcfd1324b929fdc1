"""Keras models: architecture, checks, loss maths, seeding, serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from phenocoder_lib.models import CVAE, CondCVAE, Sampling, check_architecture, make_model

SHAPE = (8, 8, 2)


def _model(n_conditions=0, seed=0, **kw):
    args = dict(input_shape=SHAPE, n_latent_dim=3, n_dense_dim=8, conv_layers=(4, 6), dropout=0.25, beta=0.5,
                n_conditions=n_conditions, seed=seed)
    args.update(kw)
    return make_model(**args)


def _batch(n=5, seed=0, n_conditions=0):
    rng = np.random.default_rng(seed)
    x = {"image": rng.random((n, *SHAPE), dtype=np.float32)}
    if n_conditions:
        x["condition"] = np.eye(n_conditions, dtype=np.float32)[rng.integers(0, n_conditions, n)]
    return x


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def test_divisibility_is_checked_with_the_fix():
    with pytest.raises(ValueError, match=r"input_shape=\(20, 20, 4\).*divisible by 2\*\*len\(conv_layers\) = 8"):
        check_architecture((20, 20, 4), (8, 16, 32), 4, 8, 0.1, 0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (8, 8)}, "input_shape"),
        ({"conv_layers": ()}, "conv_layers"),
        ({"conv_layers": (4, 0)}, "conv_layers"),
        ({"n_latent_dim": 0}, "n_latent_dim=0"),
        ({"n_dense_dim": 2.5}, "n_dense_dim=2.5"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"beta": -1}, "beta=-1"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    args = dict(input_shape=(8, 8, 2), conv_layers=(4,), n_latent_dim=2, n_dense_dim=4, dropout=0.1, beta=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        check_architecture(**args)


def test_condition_input_is_required_and_exclusive():
    with pytest.raises(ValueError, match="n_conditions=0"):
        CondCVAE(SHAPE, 2, 4, conv_layers=(4,), n_conditions=0)
    cond = _model(n_conditions=3)
    with pytest.raises(ValueError, match="condition vector of width 3"):
        cond(_batch()["image"])
    with pytest.raises(ValueError, match="CVAE has no conditions"):
        _model()({"image": _batch()["image"], "condition": np.zeros((5, 3), np.float32)})


# --------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------


def test_decoder_starts_from_the_largest_filter_count_and_mirrors_the_encoder():
    model = make_model(input_shape=(32, 32, 4), n_latent_dim=4, n_dense_dim=8, conv_layers=(8, 16, 32),
                       dropout=None, beta=0.01, n_conditions=0, seed=0)
    enc_convs = [layer for layer in model.encoder.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.filters for layer in enc_convs] == [8, 16, 32]
    reshape = model.decoder.get_layer("decoder_reshape")
    assert tuple(reshape.output.shape[1:]) == (4, 4, 32)  # bottleneck: largest filter count
    deconvs = [layer for layer in model.decoder.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [layer.filters for layer in deconvs] == [16, 8, 4]  # back to the 4 image channels
    assert tuple(model.decoder.output.shape[1:]) == (32, 32, 4)
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.encoder.layers)


def test_layer_names_are_unique_with_repeated_filter_counts():
    model = _model(conv_layers=(4, 4))
    for part in (model.encoder, model.decoder):
        names = [layer.name for layer in part.layers]
        assert len(names) == len(set(names))


def test_outputs_shapes_and_range():
    model = _model(n_conditions=2)
    out = model(_batch(n_conditions=2))
    assert tuple(out["reconstruction"].shape) == (5, *SHAPE)
    assert tuple(out["z_mean"].shape) == (5, 3)
    r = keras.ops.convert_to_numpy(out["reconstruction"])
    assert r.min() >= 0 and r.max() <= 1


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


def test_compute_loss_is_per_sample_sum_of_bce_plus_beta_kl():
    model = _model()
    x = _batch()
    y_pred = model(x, training=False)
    loss = float(keras.ops.convert_to_numpy(model.compute_loss(x=x, y_pred=y_pred)))
    logits = keras.ops.convert_to_numpy(y_pred["logits"]).astype(np.float64)
    p = 1 / (1 + np.exp(-logits))
    img = x["image"].astype(np.float64)
    bce = -(img * np.log(p) + (1 - img) * np.log(1 - p))
    recon = bce.sum(axis=(1, 2, 3)).mean()
    mu = keras.ops.convert_to_numpy(y_pred["z_mean"]).astype(np.float64)
    lv = keras.ops.convert_to_numpy(y_pred["z_log_var"]).astype(np.float64)
    kl = (-0.5 * (1 + lv - mu**2 - np.exp(lv)).sum(axis=1)).mean()
    assert loss == pytest.approx(recon + 0.5 * kl, rel=1e-5)
    assert float(model.reconstruction_loss_tracker.result()) == pytest.approx(recon, rel=1e-5)
    assert float(model.kl_loss_tracker.result()) == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_plain_fit_reports_the_three_losses_and_learns():
    keras.utils.set_random_seed(0)
    model = _model(n_conditions=2, dropout=None, beta=0.01)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = _batch(n=64, n_conditions=2)
    hist = model.fit(x, batch_size=16, epochs=8, verbose=0, validation_data=(_batch(16, 1, 2),)).history
    for key in ("loss", "reconstruction_loss", "kl_loss", "val_loss", "val_reconstruction_loss", "val_kl_loss"):
        assert len(hist[key]) == 8
    assert hist["loss"][-1] < hist["loss"][0]
    np.testing.assert_allclose(hist["loss"], np.add(hist["reconstruction_loss"], 0.01 * np.array(hist["kl_loss"])),
                               rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Seeds and serialization
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = _model(seed=1), _model(seed=1), _model(seed=2)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not all(np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights(), strict=True))


def test_sampling_is_seeded():
    mu = np.zeros((2000, 4), np.float32)
    lv = np.full((2000, 4), np.log(4.0), np.float32)
    z1 = keras.ops.convert_to_numpy(Sampling(seed=5)([mu, lv]))
    z2 = keras.ops.convert_to_numpy(Sampling(seed=5)([mu, lv]))
    np.testing.assert_array_equal(z1, z2)
    assert z1.std() == pytest.approx(2.0, rel=0.05)
    assert abs(z1.mean()) < 0.1


@pytest.mark.parametrize("n_conditions", [0, 3])
def test_keras_file_round_trip_with_safe_mode(tmp_path, n_conditions):
    model = _model(n_conditions=n_conditions, seed=4)
    x = _batch(n_conditions=n_conditions)
    model(x)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is type(model) and isinstance(loaded, CVAE)
    assert loaded.get_config() == model.get_config()
    a = keras.ops.convert_to_numpy(model.encode(x)[0])
    b = keras.ops.convert_to_numpy(loaded.encode(x)[0])
    np.testing.assert_array_equal(a, b)
    assert loaded.n_conditions == n_conditions and loaded.beta == 0.5 and loaded.dropout == 0.25


def test_another_keras_backend_is_refused_with_the_fix():
    import subprocess
    import sys

    code = "import phenocoder_lib.training"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "KERAS_BACKEND": "jax"})
    assert out.returncode != 0
    assert "KERAS_BACKEND='jax'" in out.stderr and "Unset KERAS_BACKEND" in out.stderr


def test_pipeline_train_model_refuses_no_datasets_or_clashing_names(tmp_path):
    from phenocoder_lib.pipeline import train_model

    with pytest.raises(ValueError, match="dataset_dirs is empty"):
        train_model([], tmp_path / "m", {}, keys={})
    with pytest.raises(ValueError, match=r"distinct names .*\['d', 'd'\]"):
        train_model([tmp_path / "a" / "d", tmp_path / "b" / "d"], tmp_path / "m", {}, keys={})
    assert not (tmp_path / "m").exists()  # nothing written before the arguments are checked
