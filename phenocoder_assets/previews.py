"""Small PNG previews for the asset pages (inline base64 in Markdown metadata).

Dagster 1.13 shows a Markdown metadata value inline on the asset page only when it is shorter than
1,000 characters; a picture (a data URI) is always longer, so it opens with one click on
"[Show Markdown]" in a dialog that is at most 80 % of the window wide. Every picture is therefore
downscaled here to at most :data:`MAX_WIDTH_PX` pixels wide and :data:`MAX_INLINE_BYTES` bytes, so
that it fits the dialog and keeps the event log small; the full-size file stays next to the asset's
data (the ``preview_path`` metadata).

Matplotlib and Pillow are imported inside the functions (Agg backend), never at definition load.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


#: Widest picture put into the metadata (fits the metadata dialog on a 1280 px wide window).
MAX_WIDTH_PX = 640
#: Largest PNG put into the metadata; larger ones are shrunk until they fit.
MAX_INLINE_BYTES = 300_000


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (steps run without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, path: Path | None = None, *, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes (and to ``path`` if given), then close it."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        from phenocoder_lib.io import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    return data


def fit_png(png: bytes, *, max_width: int = MAX_WIDTH_PX, max_bytes: int = MAX_INLINE_BYTES) -> bytes:
    """Return ``png`` downscaled (aspect kept) to at most ``max_width`` pixels wide and ``max_bytes`` bytes.

    A picture that already fits is returned unchanged. Larger ones are resampled with a Lanczos filter,
    halving the width further until the PNG is small enough (never below 64 px).
    """
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        width, height = img.size
        if width <= max_width and len(png) <= max_bytes:
            return png
        img = img.convert("RGBA") if img.mode not in ("RGB", "RGBA") else img
        target = min(width, max_width)
        while True:
            size = (target, max(1, round(height * target / width)))
            buf = io.BytesIO()
            img.resize(size, Image.Resampling.LANCZOS).save(buf, format="PNG", optimize=True)
            data = buf.getvalue()
            if len(data) <= max_bytes or target <= 64:
                return data
            target = max(64, target // 2)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of a PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as img:
        return img.size


def png_markdown(png: bytes, title: str) -> str:
    """Markdown with the PNG (downscaled to fit the metadata dialog) inlined as a data URI."""
    data = fit_png(png)
    return f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


def two_columns(xy: np.ndarray) -> np.ndarray:
    """Return the first two columns of ``xy`` (the only column twice when there is one) for a 2-D scatter."""
    import numpy as np

    xy = np.asarray(xy)
    return xy[:, :2] if xy.shape[1] >= 2 else np.c_[xy[:, 0], xy[:, 0]]


def new_figure(width: float = 4.0, height: float = 4.0) -> tuple[Any, Any]:
    """Create a (figure, axes) pair on the Agg backend."""
    return _pyplot().subplots(figsize=(width, height))


def image_thumbnail(planes: np.ndarray, *, title: str = "") -> bytes:
    """RGB composite of up to three (y, x) channels (each stretched to its 1-99.5 percentiles)."""
    import numpy as np

    fig, ax = new_figure(4, 4)
    rgb = np.zeros((*planes.shape[1:], 3), np.float32)
    for c in range(min(3, planes.shape[0])):
        rgb[..., c] = _stretch(planes[c])
    ax.imshow(rgb)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    return figure_png(fig)


def patch_montage(patches: np.ndarray, *, n: int = 16, title: str = "") -> bytes:
    """Grid of the first ``n`` patches (n, h, w, c), first three channels as RGB."""
    import numpy as np

    plt = _pyplot()
    k = int(min(n, len(patches)))
    cols = int(np.ceil(np.sqrt(max(k, 1))))
    rows = int(np.ceil(max(k, 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.0, rows * 1.0), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i < k:
            p = patches[i]
            rgb = np.zeros((*p.shape[:2], 3), np.float32)
            for c in range(min(3, p.shape[-1])):
                rgb[..., c] = _stretch(p[..., c])
            ax.imshow(rgb)
    fig.suptitle(title, fontsize=8)
    return figure_png(fig)


def scatter(xy: np.ndarray, labels: Any = None, *, title: str = "", xlabel: str = "", ylabel: str = "",
            invert_y: bool = False, size: float = 6.0, annotate: list[str] | None = None) -> bytes:
    """Scatter plot coloured by (categorical) labels."""
    import numpy as np

    fig, ax = new_figure(4.5, 4)
    xy = np.asarray(xy, dtype=float)
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size)
    else:
        labels = np.asarray(labels).astype(str)
        for value in sorted(set(labels.tolist()), key=lambda s: (len(s), s)):
            sel = labels == value
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, label=value)
        if len(set(labels.tolist())) <= 20:
            ax.legend(fontsize=6, markerscale=1.5, loc="best")
    if annotate is not None:
        for (x, y), text in zip(xy, annotate, strict=False):
            ax.annotate(text, (x, y), fontsize=6)
    if invert_y:
        ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=6)
    return figure_png(fig)


def training_curves(history: dict[str, list[float]], *, title: str = "training") -> bytes:
    """Loss, reconstruction loss, KL loss (training and validation) and learning rate per epoch, 2 x 2 panels."""
    import numpy as np

    plt = _pyplot()
    panels = [("loss", "loss"), ("reconstruction_loss", "reconstruction loss"), ("kl_loss", "KL loss"),
              ("learning_rate", "learning rate")]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(6.4, 4.6), squeeze=False)
    for ax, (key, label) in zip(axes.ravel(), panels, strict=True):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        for prefix, name in (("", "training"), ("val_", "validation")):
            values = history.get(prefix + key) or []
            if values:
                ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if key == "learning_rate":
            ax.set_yscale("log")
        elif ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def curves(history: dict[str, list[float]], *, title: str = "training") -> bytes:
    """Per-epoch metric curves (one line per metric, log-free)."""
    import numpy as np

    fig, ax = new_figure(5, 3.5)
    for name, values in sorted(history.items()):
        if values:
            ax.plot(np.arange(1, len(values) + 1), values, label=name, marker="o", ms=2)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)
    ax.tick_params(labelsize=6)
    return figure_png(fig)


def _stretch(plane: np.ndarray) -> np.ndarray:
    import numpy as np

    plane = np.asarray(plane, dtype=np.float32)
    lo, hi = np.percentile(plane, [1, 99.5]) if plane.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((plane - lo) / (hi - lo), 0, 1)


def heatmap(matrix: np.ndarray, labels: list[str], *, title: str = "", colorbar: str = "",
            xlabel: str = "", ylabel: str = "") -> bytes:
    """Square matrix (rows x columns labelled by ``labels``) on a diverging scale centred on 0; NaN in grey."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    k = len(labels)
    side = min(6.0, 2.5 + 0.18 * k)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    finite = m[np.isfinite(m)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-bound or -1, vmax=bound or 1)
    if k <= 40:
        ax.set_xticks(range(k), labels, fontsize=6, rotation=90)
        ax.set_yticks(range(k), labels, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(colorbar, fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return figure_png(fig)


def well_thumbnail(image: Any, sample: str) -> bytes:
    """Thumbnail of a well's image: max projection (3-D) of the first three channels, strided to at most ~512 px.

    Parameters
    ----------
    image
        The well's image (``c[, z], y, x``; an ``xarray.DataArray`` or array, dask-backed or not).
    sample
        The well's sample name (the title).

    Returns
    -------
    bytes
        The PNG.
    """
    import numpy as np

    arr = getattr(image, "data", image)
    step = max(1, int(np.ceil(max(arr.shape[-2:]) / 512)))
    arr = arr[..., ::step, ::step]
    if arr.ndim == 4:
        arr = arr.max(axis=1)
    return image_thumbnail(np.asarray(arr[:3]), title=sample)
