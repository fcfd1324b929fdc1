"""Helpers shared by the asset bodies (no heavy imports at module level)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dagster import DataVersion, MetadataValue

from ..previews import png_markdown

SDATA_FILE = "sdata.zarr"
LATENTS_FILE = "latents.h5ad"
LABELS_FILE = "labels.parquet"
STATS_FILE = "stats.h5ad"
EMBEDDING_FILE = "embedding.h5ad"
PREVIEW_FILE = "preview.png"
#: Written into every asset folder with the data version the materialization reported, so that a
#: downstream step derives its own version from the versions of exactly the folders it read.
VERSION_FILE = "data_version.json"
#: Version recorded for an upstream folder written before data versions existed.
UNVERSIONED = "unversioned"


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
            self.seconds[name] = time.perf_counter() - t0

    def metadata(self) -> dict[str, Any]:
        return {f"seconds_{k}": number(v) for k, v in self.seconds.items()}


#: Significant digits of every float shown on an asset page (``1907.3880615234375`` reads ``1907``).
SIGNIFICANT_DIGITS = 4


def round_sig(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (NaN and infinities unchanged)."""
    value = float(value)
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits}g}")


def round_floats(obj: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every float rounded by :func:`round_sig`."""
    if isinstance(obj, float):
        return round_sig(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def number(value: float) -> Any:
    """A float metadata value rounded to :data:`SIGNIFICANT_DIGITS` significant digits."""
    return MetadataValue.float(round_sig(value))


def check_known_samples(context: Any, samples: list[str], field: str) -> None:
    """Raise ``ValueError`` when ``samples`` (a config field) names keys that are not registered partitions."""
    from ..partitions import SAMPLES

    known = set(context.instance.get_dynamic_partitions(SAMPLES))
    unknown = [s for s in samples if s not in known]
    if unknown:
        shown = ", ".join(sorted(known)[:8]) + (" ..." if len(known) > 8 else "")
        raise ValueError(f"{field}={unknown} names unknown samples; registered samples are: {shown or 'none'}. "
                         "Fix the names, or drop the plate into the landing folder so the sensor registers it.")


def preview_metadata(png: bytes | None, title: str, final_dir: str | None = None) -> dict[str, Any]:
    """``preview`` (the picture, one click away in the UI) and ``preview_path`` (the full-size file)."""
    if png is None:
        return {}
    meta: dict[str, Any] = {"preview": MetadataValue.md(png_markdown(png, title))}
    if final_dir is not None:
        meta["preview_path"] = MetadataValue.path(f"{final_dir}/{PREVIEW_FILE}")
    return meta


def write_png(path: Path, png: bytes | None) -> None:
    if png is not None:
        from phenocoder_lib.io import atomic_file

        with atomic_file(path) as tmp:
            tmp.write_bytes(png)


# ----------------------------------------------------------------------------------------------
# Data versions: Dagster marks a partition STALE when the data version of something it was computed
# from changed. Versions are digests, never random, so a rerun that writes the same data (or
# derives it from the same inputs with the same settings and code) reports the same version and
# leaves everything downstream FRESH.
# ----------------------------------------------------------------------------------------------


def digest(*parts: Any) -> str:
    """SHA-256 (24 hex digits) of ``parts`` as canonical JSON (:func:`phenocoder_lib.pipeline.content_digest`)."""
    from phenocoder_lib.pipeline import content_digest

    return content_digest(*parts)


def array_digest(arrays: Iterable[Any]) -> str:
    """Content digest of ``arrays``: dtypes, shapes and bytes (:func:`phenocoder_lib.pipeline.array_digest`)."""
    from phenocoder_lib.pipeline import array_digest as digest_arrays

    return digest_arrays(arrays)


def settings_of(config: Any, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The run config fields that change what a stage writes (``exclude``: cosmetic ones such as previews)."""
    return config.model_dump(exclude=set(exclude))


def logical_version(code_version: str, settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Version of a deterministic stage: digest of its code version, settings and input versions."""
    return digest("v1", code_version, dict(settings), dict(inputs))


def read_version(storage: Any, asset: str, partition: str | None = None) -> str:
    """The data version recorded in the folder of ``asset``/``partition`` (``"unversioned"`` when absent)."""
    url = f"{storage.url(asset, partition)}/{VERSION_FILE}"
    try:
        if storage.is_local:
            text = Path(url).read_text()
        else:
            import fsspec

            with fsspec.open(url, "r") as f:
                text = f.read()
        return str(json.loads(text)["data_version"])
    except (OSError, KeyError, ValueError):
        return UNVERSIONED


def write_version(out: Path, version: str, inputs: Mapping[str, Any] | None = None) -> DataVersion:
    """Record ``version`` (and the input versions it came from) in a staged folder; return it for Dagster."""
    from phenocoder_lib.io import write_json_atomic

    write_json_atomic(out / VERSION_FILE, {"data_version": version, "inputs": dict(inputs or {})})
    return DataVersion(version)


def source_digest(plate_dir: Path, plate: str, well: str, layout: Any, files: Any = None) -> str | None:
    """Digest of one well's files as the sensor computes it (the sensor skips wells already ingested).

    ``files``: the plate's :class:`phenocoder_lib.ingest.PlateFiles` (or the well's) where already scanned;
    only the well's own files are looked at.
    """
    from phenocoder_lib.ingest import scan_plate

    from ..sensors import well_digests

    files = files if files is not None else scan_plate(plate_dir, layout=layout, plate=plate)
    if well not in files.wells:
        return None
    return well_digests(plate_dir, files.per_well([well])[well], [])[well]


def sdata_summaries(storage: Any, samples: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``sample -> summary.json`` of ``sdata`` (plate, well, plate folder) for the samples whose one is readable."""
    from ..state import SUMMARY, read_json

    out = {}
    for s in samples:
        try:
            if storage.exists("sdata", s):
                out[s] = read_json(storage.local_path("sdata", s) / SUMMARY)
        except (OSError, ValueError):
            continue  # an unreadable summary: the well is shown and scored without its plate
    return out
