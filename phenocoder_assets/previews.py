"""Small PNG previews for the asset pages (inline base64 in Markdown metadata).

Matplotlib is imported inside the functions (Agg backend), never at definition load.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


_MAX_INLINE_BYTES = 400_000  # keep event-log entries small; larger images go by path only


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (steps run without a display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, path: Path | None = None, *, dpi: int = 80) -> bytes:
    """Render a matplotlib figure to PNG bytes (and to ``path`` if given), then close it."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        from phenocoder_lib._io import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    return data


def png_markdown(png: bytes, title: str) -> str:
    """Markdown with the PNG inlined as a data URI (or a note when it is too large to inline)."""
    if len(png) > _MAX_INLINE_BYTES:
        return f"**{title}**: preview too large to inline ({len(png) // 1024} KiB); see the file path metadata."
    return f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


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
