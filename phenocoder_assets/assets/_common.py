"""Helpers shared by the asset bodies (no heavy imports at module level)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import MetadataValue

from ..previews import png_markdown

SDATA_FILE = "sdata.zarr"
LATENTS_FILE = "latents.h5ad"
LABELS_FILE = "labels.parquet"
STATS_FILE = "stats.h5ad"
EMBEDDING_FILE = "embedding.h5ad"
PREVIEW_FILE = "preview.png"


class Timer:
    """Wall-clock seconds of named phases, for the asset metadata."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)

    def metadata(self) -> dict[str, Any]:
        return {f"seconds_{k}": MetadataValue.float(v) for k, v in self.seconds.items()}


def preview_metadata(png: bytes | None, title: str, final_dir: str | None = None) -> dict[str, Any]:
    if png is None:
        return {}
    meta: dict[str, Any] = {"preview": MetadataValue.md(png_markdown(png, title))}
    if final_dir is not None:
        meta["preview_path"] = MetadataValue.path(f"{final_dir}/{PREVIEW_FILE}")
    return meta


def write_png(path: Path, png: bytes | None) -> None:
    if png is not None:
        from phenocoder_lib._io import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_bytes(png)
