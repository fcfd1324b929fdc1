"""Preview figures (no TensorFlow): files written, PCA fallback, colours by type."""

from __future__ import annotations

import numpy as np
import pytest

from phenocoder_lib import plotting


def test_reconstruction_montage_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((7, 12, 12, 3), dtype=np.float32)
    path = plotting.plot_reconstructions(x, x * 0.5, tmp_path / "rec.png", channels=["a", "b", "c"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="no patches"):
        plotting.plot_reconstructions(x[:0], x[:0], tmp_path / "empty.png")


def test_small_latent_sets_use_a_deterministic_pca():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 6)) * [5, 3, 1, 1, 1, 1]
    xy, method = plotting.embed_2d(z)
    assert method == "pca" and xy.shape == (50, 2)
    again, _ = plotting.embed_2d(-z)  # sign conventions of the SVD do not change the picture
    np.testing.assert_allclose(np.abs(np.corrcoef(xy[:, 0], z[:, 0])[0, 1]), 1, atol=0.05)
    np.testing.assert_allclose(np.abs(again), np.abs(xy), atol=1e-8)
    assert plotting.embed_2d(z[:1])[0].shape == (1, 2)


def test_latent_plot_colours_numeric_and_categorical_columns(tmp_path):
    rng = np.random.default_rng(2)
    xy = rng.normal(size=(40, 2))
    colors = {"sample": np.repeat(["w1", "w2"], 20), "z": np.arange(40) % 7, "dataset": np.repeat(["d"], 40)}
    path = plotting.plot_latent_space(xy, colors, tmp_path / "lat.png", method="pca")
    assert path.exists() and path.stat().st_size > 1000


def test_history_plot(tmp_path):
    history = {"loss": [3.0, 2.0], "val_loss": [3.5, 2.5], "reconstruction_loss": [3.0, 2.0],
               "kl_loss": [0.1, 0.2], "learning_rate": [1e-3, 2e-4], "epoch": [1.0, 2.0]}
    assert plotting.plot_history(history, tmp_path / "h.png").exists()
