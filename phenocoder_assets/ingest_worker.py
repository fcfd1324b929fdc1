"""The work of one well of the ``sdata`` asset, without Dagster: run in the step or in a worker process.

A plate run of ``sdata`` hands its wells to worker processes
(:class:`phenocoder_lib.parallel.PrefetchPool`), which import this module and not Dagster; each writes the
well's store into a scratch folder and returns :class:`IngestedFiles`, which the step moves into the well's
staged asset folder and records (summary, data version, metadata) one well at a time, in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Modules the ingest workers' forkserver imports once, besides the library's (matplotlib is left to the first
#: preview, which selects its Agg backend before pyplot is imported).
WORKER_PRELOAD = ("phenocoder_assets.ingest_worker", "phenocoder_assets.previews")


@dataclass(frozen=True)
class IngestedFiles:
    """One well written by :func:`ingest_and_preview` (small: it travels back from a worker process).

    Parameters
    ----------
    sdata_file
        The SpatialData zarr store written.
    summary
        ``summary.json`` of the well (:func:`phenocoder_lib.pipeline.ingest_well`).
    seconds
        Wall-clock seconds of ``read``, ``write`` and ``preview``.
    png
        The well's thumbnail (``None`` without a preview).
    """

    sdata_file: Path
    summary: dict[str, Any]
    seconds: dict[str, float]
    png: bytes | None


def ingest_and_preview(*, plate_dir: str | Path, sdata_file: str | Path, plate: str, well: str, layout: Any,
                       source_digest: str | None, preview: bool, read: dict[str, Any],
                       files: Any = None) -> IngestedFiles:
    """Ingest one well into ``sdata_file`` (:func:`phenocoder_lib.pipeline.ingest_well`), render its thumbnail.

    Parameters
    ----------
    plate_dir, plate, well, layout, source_digest
        As in :func:`phenocoder_lib.pipeline.ingest_well`.
    sdata_file
        The store to write.
    preview
        Render the max-projection thumbnail (:func:`phenocoder_assets.previews.well_thumbnail`).
    read
        The other keyword arguments of :func:`~phenocoder_lib.pipeline.ingest_well` (keys, geometry).
    files
        The well's :class:`phenocoder_lib.ingest.PlateFiles` from the run's scan of the plate (``None``: scan).

    Returns
    -------
    IngestedFiles
        What was written, and the thumbnail.
    """
    from phenocoder_lib.pipeline import ingest_well

    from .previews import well_thumbnail

    ingested = ingest_well(plate_dir, sdata_file, plate=plate, well=well, layout=layout,
                           source_digest=source_digest, files=files, **read)
    seconds, png = dict(ingested.seconds), None
    if preview:
        t0 = time.perf_counter()
        png = well_thumbnail(_written_image(Path(sdata_file), ingested), ingested.summary["sample"])
        seconds["preview"] = time.perf_counter() - t0
    return IngestedFiles(sdata_file=Path(sdata_file), summary=ingested.summary, seconds=seconds, png=png)


def _written_image(sdata_file: Path, ingested: Any) -> Any:
    """The well's image as written to ``sdata_file``, or the source image where the store has no single-scale one.

    Zarr chunks decode in half the time of the source PNGs: 0.32 against 0.70 CPU-s for the thumbnail of a
    52-slice well; the thumbnail is the same.
    """
    import spatialdata as sd
    import xarray as xr

    name = f"{ingested.summary['image_key']}_{ingested.summary['sample']}"
    written = sd.read_zarr(sdata_file, selection=("images",)).images.get(name)
    return written if isinstance(written, xr.DataArray) else ingested.image
