"""``sdata``: one well of a plate export -> SpatialData zarr (partition ``<plate>_<well>``)."""

from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult

from ..configs import IngestConfig
from ..metadata_docs import describe
from ..partitions import split_sample
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import SDATA_FILE, logical_version, settings_of, source_digest, write_version

CODE_VERSION = "1"
#: Settings that change only the preview, not the data (left out of the data version).
COSMETIC = ("preview",)
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
    """:func:`phenocoder_lib.ingest.read_plate` for the partition's well, written atomically."""
    yield from for_each_well(context, lambda sample: _sdata_one(context, config, storage, sample),
                             upstream=())


def _sdata_one(context: AssetExecutionContext, config: IngestConfig, storage: PhenocoderStorage,
               sample: str) -> MaterializeResult:
    """One well of ``sdata`` (:func:`phenocoder_lib.pipeline.ingest_well`)."""
    from phenocoder_lib.io import write_json_atomic
    from phenocoder_lib.pipeline import ingest_well

    from ..metadata import sdata_result
    from ..state import SUMMARY

    plate, well = split_sample(sample)
    plate_dir = Path(config.plate_dir) if config.plate_dir else storage.landing_dir / plate
    digest = source_digest(plate_dir, plate, well, config.layout())
    # the well's files (names, sizes, times) and the reading settings: a re-export or another setting is a
    # new version, an unchanged rerun the same one
    inputs = {"source": str(digest)}
    version = logical_version(CODE_VERSION, settings_of(config, COSMETIC), inputs)
    with storage.stage("sdata", sample) as out:
        ingested = ingest_well(plate_dir, out / SDATA_FILE, plate=plate, well=well, layout=config.layout(),
                               source_digest=digest, **config.model_dump(include=READ_SETTINGS))
        write_json_atomic(out / SUMMARY, ingested.summary)
        data_version = write_version(out, version, inputs)
        result = sdata_result(context, ingested, out, storage.url("sdata", sample), data_version,
                              preview=config.preview)
    return result
