"""``sdata``: one well of a plate export -> SpatialData zarr (partition ``<plate>_<well>``)."""

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import AssetExecutionContext, MaterializeResult

from ..configs import IngestConfig
from ..metadata_docs import describe
from ..partitions import split_sample
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import SDATA_FILE, logical_version, settings_of, source_digest, write_version

CODE_VERSION = "1"
#: Settings that change only the preview or the speed, not the data (left out of the data version).
COSMETIC = ("preview", "workers")
#: Settings of :func:`phenocoder_lib.pipeline.ingest_well` besides the plate layout.
READ_SETTINGS = {"pixel_size_um", "z_step_um", "table_scale", "image_key", "table_key", "sample_key"}


@per_sample_asset(
    kinds={"spatialdata", "zarr"},
    code_version=CODE_VERSION,
    pool='ingest',
    description=describe("sdata", "One well of a plate export read into a SpatialData object (images, labels, "
                         "per-object table in um), written as `<root>/sdata/<sample>/sdata.zarr`."),
)
def sdata(context: AssetExecutionContext, config: IngestConfig, storage: PhenocoderStorage):
    """:func:`phenocoder_lib.ingest.read_plate` for the partition's well, written atomically.

    A run of several wells (a plate run, a backfill) ingests them in worker processes (``config.workers``;
    by default where that pays, :func:`phenocoder_lib.ingest.ingest_worker_count`) ahead of the step, which
    records them one by one, in order, as it does when it ingests them itself.
    """
    from phenocoder_lib.parallel import POOL_START_ERRORS

    keys = list(context.partition_keys)
    planned = _plan(context, config, storage, keys)
    with contextlib.ExitStack() as stack:
        pool = None
        if len(keys) > 1 and config.workers != 1:
            try:
                pool = _start_workers(context, config, storage, planned, stack)
            except POOL_START_ERRORS as err:
                context.log.warning(f"no ingest worker processes ({type(err).__name__}: {err}); the wells are "
                                    "ingested in the step, one by one")
        yield from for_each_well(context, lambda sample: _sdata_one(context, config, storage, sample,
                                                                    planned.get(sample), pool), upstream=())


@dataclass(frozen=True)
class _Planned:
    """A well of the run, found by its plate's one scan."""

    plate_dir: Path
    files: Any  #: the well's :class:`phenocoder_lib.ingest.PlateFiles` (:meth:`~PlateFiles.per_well`)


def _plan(context: AssetExecutionContext, config: IngestConfig, storage: PhenocoderStorage,
          keys: list[str]) -> dict[str, _Planned]:
    """The run's wells with their files: one scan per plate, however many of its wells the run has.

    A scan lists every file of the plate (about a second for a full 384-well confocal export), so a well that
    scanned its plate itself made a plate run quadratic. A plate that cannot be scanned, or a well not in it,
    is left out: such wells are read on their own and fail with the reason, as in a one-well run.
    """
    from phenocoder_lib.ingest import scan_plate

    by_plate: dict[str, list[tuple[str, str]]] = {}
    for sample in keys:
        plate, well = split_sample(sample)
        by_plate.setdefault(plate, []).append((sample, well))
    planned = {}
    for plate, samples in by_plate.items():
        plate_dir = _plate_dir(config, storage, plate)
        try:
            files = scan_plate(plate_dir, layout=config.layout(), plate=plate)
        except Exception as err:  # noqa: BLE001 - an unreadable plate: its wells fail on their own, as before
            if len(samples) > 1:
                context.log.warning(f"plate {plate!r}: {type(err).__name__}: {err}; each of its wells tries on "
                                    "its own")
            continue
        present = set(files.wells)
        own = files.per_well([well for _, well in samples if well in present])
        planned.update({sample: _Planned(plate_dir, own[well]) for sample, well in samples if well in own})
    return {sample: planned[sample] for sample in keys if sample in planned}  # the run's order


def _plate_dir(config: IngestConfig, storage: PhenocoderStorage, plate: str) -> Path:
    return Path(config.plate_dir) if config.plate_dir else storage.landing_dir / plate


def _job(config: IngestConfig, plate_dir: Path, sample: str, sdata_file: Path, digest: str | None,
         files: Any = None) -> dict[str, Any]:
    """Keyword arguments of :func:`phenocoder_assets.ingest_worker.ingest_and_preview` for one well."""
    plate, well = split_sample(sample)
    return dict(plate_dir=str(plate_dir), sdata_file=str(sdata_file), plate=plate, well=well, layout=config.layout(),
                source_digest=digest, preview=config.preview, read=config.model_dump(include=READ_SETTINGS),
                files=files)


def _start_workers(context: AssetExecutionContext, config: IngestConfig, storage: PhenocoderStorage,
                   planned: dict[str, _Planned], stack: contextlib.ExitStack) -> Any:
    """A :class:`~phenocoder_lib.parallel.PrefetchPool` ingesting the ``planned`` wells into a scratch folder.

    ``None`` where the work does not pay for a pool (:func:`phenocoder_lib.ingest.ingest_worker_count`).
    """
    from phenocoder_lib.ingest import INGEST_PRELOAD, image_pixels, ingest_worker_count
    from phenocoder_lib.parallel import PrefetchPool

    from ..ingest_worker import WORKER_PRELOAD, ingest_and_preview
    from ..sensors import well_digests

    pixels = sum(image_pixels(p.files, p.files.wells) for p in planned.values())
    workers = ingest_worker_count(config.workers, len(planned), pixels)
    if workers < 2:
        return None
    scratch = stack.enter_context(storage.scratch("sdata"))
    jobs = {}
    for sample, p in planned.items():  # in the run's order, as the step takes them
        digest = well_digests(p.plate_dir, p.files, [])[p.files.wells[0]]
        jobs[sample] = _job(config, p.plate_dir, sample, scratch / sample / SDATA_FILE, digest, p.files)

    def broken(reason: str) -> None:
        context.log.warning(f"the ingest worker processes stopped ({reason}); the remaining wells are ingested "
                            "in the step, one by one")

    context.log.info(f"ingesting {len(jobs)} wells in {workers} worker processes")
    return stack.enter_context(PrefetchPool(ingest_and_preview, jobs, workers=workers, on_broken=broken,
                                            preload=(*INGEST_PRELOAD, *WORKER_PRELOAD)))


def _sdata_one(context: AssetExecutionContext, config: IngestConfig, storage: PhenocoderStorage,
               sample: str, planned: _Planned | None = None, pool: Any = None) -> MaterializeResult:
    """One well of ``sdata``: taken from a worker (``pool``) or ingested here (with its ``planned`` files)."""
    from phenocoder_lib.io import write_json_atomic

    from ..ingest_worker import ingest_and_preview
    from ..metadata import sdata_result
    from ..state import SUMMARY

    plate, _ = split_sample(sample)
    plate_dir = _plate_dir(config, storage, plate)
    done, ingested = pool.take(sample) if pool is not None else (False, None)
    with storage.stage("sdata", sample) as out:
        if done:
            out.mkdir(parents=True)
            shutil.move(ingested.sdata_file, out / SDATA_FILE)  # a rename where the root is local
        else:
            files = planned.files if planned is not None else None
            digest = source_digest(plate_dir, plate, split_sample(sample)[1], config.layout(), files=files)
            ingested = ingest_and_preview(**_job(config, plate_dir, sample, out / SDATA_FILE, digest, files))
        # the well's files (names, sizes, times) and the reading settings: a re-export or another setting is a
        # new version, an unchanged rerun the same one
        inputs = {"source": str(ingested.summary["source_digest"])}
        version = logical_version(CODE_VERSION, settings_of(config, COSMETIC), inputs)
        write_json_atomic(out / SUMMARY, ingested.summary)
        data_version = write_version(out, version, inputs)
        result = sdata_result(context, ingested, out, storage.url("sdata", sample), data_version)
    return result
