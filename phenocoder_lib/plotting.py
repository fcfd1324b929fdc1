"""Figures rendered to PNG files (matplotlib, Agg backend): reconstructions, latent space, training curves.

:func:`training_previews` draws the three of a trained model (and logs them to TensorBoard);
:func:`principal_components` is the PCA of the latent previews.

Every function takes the data it draws and a path, creates its own figure, saves it and closes it
(no global pyplot state is left behind, and nothing is shown on screen).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["embed_2d", "plot_history", "plot_latent_space", "plot_reconstructions", "principal_components",
           "training_previews"]

#: Below this many points the latent plot uses PCA (UMAP needs a neighbourhood and compiles slowly).
UMAP_MIN_POINTS = 200


def _figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .io import atomic_file

    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_file(path) as tmp:  # removed again if savefig fails
        fig.savefig(tmp, dpi=dpi)
    return path


def plot_reconstructions(
    inputs: np.ndarray,
    reconstructions: np.ndarray,
    path: str | Path,
    *,
    channels: Sequence[str] | None = None,
    title: str = "input | reconstruction",
) -> Path:
    """Montage per channel of ``[input | reconstruction]`` pairs, both on the model's [0, 1] scale.

    Parameters
    ----------
    inputs, reconstructions
        (n, h, w, c) patches and their reconstructions; one panel per channel.
    path
        The PNG file.
    channels
        Channel names for the panel titles (default: their numbers).
    title
        Figure title (the patch count is appended).

    Returns
    -------
    Path
        ``path``.
    """
    n, h, w, c = inputs.shape
    if n == 0:
        raise ValueError("plot_reconstructions: no patches to show.")
    channels = list(channels) if channels is not None else [str(i) for i in range(c)]
    ncols = max(1, int(math.ceil(math.sqrt(n * h / (2 * w)))))
    nrows = int(math.ceil(n / ncols))
    gap = 1  # between a patch and its reconstruction
    pair_gap = max(3, w // 6)  # between pairs
    tile_w, tile_h = 2 * w + gap + pair_gap, h + pair_gap
    panels = []
    for ch in range(c):
        canvas = np.full((nrows * tile_h + pair_gap, ncols * tile_w + pair_gap), np.nan, np.float32)
        for i in range(n):
            r, q = divmod(i, ncols)
            y0, x0 = r * tile_h + pair_gap, q * tile_w + pair_gap
            canvas[y0:y0 + h, x0:x0 + w] = inputs[i, :, :, ch]
            canvas[y0:y0 + h, x0 + w + gap:x0 + 2 * w + gap] = reconstructions[i, :, :, ch]
        panels.append(canvas)
    aspect = panels[0].shape[1] / panels[0].shape[0]
    grid_cols = min(c, 2)
    grid_rows = int(math.ceil(c / grid_cols))
    # About one screen pixel per patch pixel (dpi 110), at least 3 inches per panel.
    panel_w = float(np.clip(panels[0].shape[1] / 110.0, 3.0, 9.0))
    panel_h = panel_w / aspect
    fig, axes = _figure((panel_w * grid_cols, panel_h * grid_rows + 0.5 * grid_rows + 0.4), grid_rows, grid_cols)
    for ch, canvas in enumerate(panels):
        ax = axes[ch // grid_cols, ch % grid_cols]
        ax.imshow(np.ma.masked_invalid(canvas), cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"channel {channels[ch]}", fontsize=9)
        ax.set_axis_off()
    for k in range(c, grid_rows * grid_cols):
        axes[k // grid_cols, k % grid_cols].set_axis_off()
    fig.suptitle(f"{title} ({n} patches)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def embed_2d(latents: np.ndarray, *, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """2-D coordinates of ``latents`` for plotting: UMAP for ``UMAP_MIN_POINTS`` points or more, else PCA.

    Parameters
    ----------
    latents
        (n, L) values.
    seed
        UMAP's random state.
    method
        ``"auto"``, ``"umap"`` or ``"pca"`` (PCA with component signs fixed, so the figure is reproducible).

    Returns
    -------
    tuple
        ``(coordinates (n, 2), the method used)``.
    """
    x = np.asarray(latents, np.float64)
    n = len(x)
    if method == "auto":
        method = "umap" if n >= UMAP_MIN_POINTS else "pca"
    if method == "umap":
        try:
            from ._lazy import import_scanpy

            import_scanpy()  # imports umap without TensorFlow's parametric UMAP
            import umap

            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1)
            return np.asarray(reducer.fit_transform(x)), "umap"
        except ImportError:  # pragma: no cover - umap-learn is a dependency
            logger.warning("umap-learn is not importable; the latent plot uses PCA.")
    centred = x - x.mean(axis=0)
    if n < 2 or x.shape[1] == 0:
        return np.zeros((n, 2)), "pca"
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = centred @ vt[:2].T
    if comps.shape[1] < 2:
        comps = np.hstack([comps, np.zeros((n, 2 - comps.shape[1]))])
    # Fix the sign of each component (SVD signs are arbitrary) so the figure is reproducible.
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(2)])
    return comps * np.where(signs == 0, 1, signs), "pca"


def plot_latent_space(
    coords: np.ndarray,
    colors: Mapping[str, Sequence[Any] | np.ndarray],
    path: str | Path,
    *,
    method: str = "umap",
    max_legend: int = 20,
) -> Path:
    """Scatter of 2-D latent ``coords``, one panel per entry of ``colors``.

    Numeric columns are coloured on a continuous scale in numeric order (colour bar); other columns by
    category (legend up to ``max_legend`` categories).

    Parameters
    ----------
    coords
        (n, 2) coordinates (:func:`embed_2d`).
    colors
        Panel title -> one value per point.
    path
        The PNG file.
    method
        The embedding's name, for the axis labels.
    max_legend
        Most categories listed in a legend.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    panels = list(colors.items()) or [("", np.zeros(len(coords)))]
    ncols = min(len(panels), 3)
    nrows = int(math.ceil(len(panels) / ncols))
    fig, axes = _figure((4.2 * ncols, 3.8 * nrows), nrows, ncols)
    size = max(2.0, min(20.0, 3000.0 / max(len(coords), 1)))
    for k, (name, values) in enumerate(panels):
        ax = axes[k // ncols, k % ncols]
        values = pd.Series(np.asarray(values))
        if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype) \
                and values.nunique() > 2:
            sc = ax.scatter(coords[:, 0], coords[:, 1], c=values.to_numpy(np.float64), s=size, cmap="viridis",
                            linewidths=0)
            ax.figure.colorbar(sc, ax=ax, shrink=0.8)
        else:
            cats = sorted(values.astype(str).unique())
            cmap = matplotlib.colormaps["tab20"]
            for i, cat in enumerate(cats):
                m = (values.astype(str) == cat).to_numpy()
                ax.scatter(coords[m, 0], coords[m, 1], s=size, color=cmap(i % 20), linewidths=0,
                           label=cat if i < max_legend else None)
            if cats and len(cats) <= max_legend:
                ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{method.upper()} 1", fontsize=8)
        ax.set_ylabel(f"{method.upper()} 2", fontsize=8)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    fig.suptitle(f"latent space (z_mean, {len(coords)} patches, {method.upper()})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_history(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Training curves: loss, reconstruction and KL (train and validation) and the learning rate.

    Parameters
    ----------
    history
        Metrics per epoch (``training.fit``'s history).
    path
        The PNG file.

    Returns
    -------
    Path
        ``path``.
    """
    keys = ["loss", "reconstruction_loss", "kl_loss", "learning_rate"]
    fig, axes = _figure((13.0, 3.0), 1, len(keys))
    epochs = np.asarray(history.get("epoch", range(1, len(history.get("loss", [])) + 1)))
    for ax, key in zip(axes[0], keys, strict=True):
        if key in history:
            ax.plot(epochs, history[key], marker="o", ms=3, label="train" if key != "learning_rate" else None)
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", ms=3, label="validation")
            ax.legend(fontsize=7, frameon=False)
        if key == "learning_rate":
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def principal_components(x: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Coordinates of the rows of ``x`` on its first principal axes (the axes fitted on the finite rows).

    Parameters
    ----------
    x
        (n, d) values, e.g. latents.
    n_components
        Axes kept; zero columns pad the result when ``x`` has fewer.

    Returns
    -------
    numpy.ndarray
        (n, n_components) coordinates (rows with a NaN give NaN).
    """
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    finite = centred[np.isfinite(centred).all(axis=1)]
    if len(finite) == 0 or x.shape[1] == 0:
        return np.zeros((len(x), n_components))
    _, _, vt = np.linalg.svd(finite, full_matrices=False)
    comps = centred @ vt[:n_components].T
    if comps.shape[1] < n_components:
        comps = np.hstack([comps, np.zeros((len(x), n_components - comps.shape[1]))])
    return comps


def training_previews(run: Any, *, obs: pd.DataFrame | None = None, n_preview: int = 300,
                      plot_frac: float = 0.001) -> list[Path]:
    """Draw a trained model's previews into its folder and, with a log folder, into TensorBoard.

    ``history.png`` (training curves), ``reconstructions.png`` (``n_preview`` seeded validation patches and
    their reconstructions from ``z_mean``) and ``latent_space.png`` (``z_mean`` of a seeded ``plot_frac``
    share of the training patches, at least one batch; UMAP, or PCA below :data:`UMAP_MIN_POINTS`),
    coloured by sample and by each condition.

    Parameters
    ----------
    run
        A :class:`~phenocoder_lib.training.TrainedModel` with its batches and history.
    obs
        The source table's ``.obs``, for conditions that are not columns of the patch index.
    n_preview
        Validation patches shown.
    plot_frac
        Share of the training patches whose latents are drawn.

    Returns
    -------
    list of Path
        The files written.
    """
    from .conditions import condition_frame
    from .training import predict_z_mean, reconstruct

    train, val = run.batches
    data, config, folder = train.data, run.config, Path(run.folder)
    seed = config["seed"]
    written = [plot_history(run.history, folder / "history.png")]
    rng = np.random.default_rng([seed, 11])
    show = np.sort(rng.choice(val.positions, size=min(n_preview, len(val.positions)), replace=False))
    inputs, recon = reconstruct(run.model, data, show)
    written.append(plot_reconstructions(
        inputs, recon, folder / "reconstructions.png",
        channels=config["dataset_settings"][config["datasets"][0]]["channels"],
        title="validation patches: input | reconstruction from z_mean"))
    n_latent = min(len(train.positions), max(int(np.ceil(plot_frac * len(train.positions))), train.batch_size))
    pick = np.sort(rng.choice(train.positions, size=n_latent, replace=False))
    coords, method = embed_2d(predict_z_mean(run.model, data, pick), seed=seed)
    colors: dict[str, Any] = {"sample": data.index["sample"].to_numpy()[pick]}
    if config["conditions"]:
        frame = condition_frame(config["conditions"], index=data.index.iloc[pick],
                                sample_key=config["keys"]["sample_key"], obs=obs)
        colors.update({col: frame[col].to_numpy() for col in config["conditions"]})
    written.append(plot_latent_space(coords, colors, folder / "latent_space.png", method=method))
    if run.log_dir is not None:
        _images_to_tensorboard(written[1:], Path(run.log_dir) / "previews")
    return written


def _images_to_tensorboard(pngs: Sequence[Path], log_dir: Path) -> None:
    """The PNG previews as TensorBoard images (step 0), so they sit beside the training curves."""
    import tensorflow as tf
    from matplotlib.image import imread

    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        for png in pngs:
            tf.summary.image(png.stem, imread(png)[..., :3][None], step=0)
    writer.close()
