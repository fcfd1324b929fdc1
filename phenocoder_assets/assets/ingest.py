"""``sdata``: one well of a plate export -> SpatialData zarr (partition ``<plate>_<well>``)."""

from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue

from ..configs import IngestConfig
from ..metadata_docs import describe
from ..partitions import split_sample
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import (
    PREVIEW_FILE,
    SDATA_FILE,
    Timer,
    logical_version,
    preview_metadata,
    settings_of,
    write_png,
    write_version,
)

CODE_VERSION = "1"
#: Settings that change only the preview, not the data (left out of the data version).
COSMETIC = ("preview",)


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
    """One well of ``sdata``."""
    from phenocoder_lib.ingest import read_plate, scan_plate, write_sdata
    from phenocoder_lib.io import write_json_atomic

    from ..sensors import well_digests

    plate, well = split_sample(sample)
    plate_dir = Path(config.plate_dir) if config.plate_dir else storage.landing_dir / plate
    timer = Timer()
    # digest of the well's files as the sensor computes it: the sensor skips wells already ingested
    digest = well_digests(plate_dir, scan_plate(plate_dir, layout=config.layout(), plate=plate), []).get(well)
    with timer.phase("read"):
        sd = read_plate(plate_dir, wells=[well], plate=plate, layout=config.layout(),
                        pixel_size_um=config.pixel_size_um, z_step_um=config.z_step_um,
                        table_scale=config.table_scale, image_key=config.image_key,
                        table_key=config.table_key, sample_key=config.sample_key)
    table = sd.tables[config.table_key]
    image = sd.images[f"{config.image_key}_{sample}"]
    png = None
    # the well's files (names, sizes, times) and the reading settings: a re-export or another setting is a
    # new version, an unchanged rerun the same one
    inputs = {"source": str(digest)}
    version = logical_version(CODE_VERSION, settings_of(config, COSMETIC), inputs)
    with storage.stage("sdata", sample) as out:
        with timer.phase("write"):
            write_sdata(sd, out / SDATA_FILE)
        summary = {
            "sample": sample, "plate": plate, "well": well, "plate_dir": str(plate_dir), "source_digest": digest,
            "table_key": config.table_key, "image_key": config.image_key, "sample_key": config.sample_key,
            "n_objects": int(table.n_obs), "n_features": int(table.n_vars),
            "image_shape": [int(s) for s in image.shape], "image_dims": list(image.dims),
            "channels": [str(c) for c in image.coords["c"].values],
        }
        write_json_atomic(out / "summary.json", summary)
        data_version = write_version(out, version, inputs)
        if config.preview:
            with timer.phase("preview"):
                png = _thumbnail(image, sample)
            write_png(out / PREVIEW_FILE, png)
    final = storage.url("sdata", sample)
    context.log.info(f"{sample}: {table.n_obs} objects, image {tuple(image.shape)} -> {final}")
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, f"{sample}: max projection", final),
        "n_objects": MetadataValue.int(int(table.n_obs)),
        "n_features": MetadataValue.int(int(table.n_vars)),
        "image_shape": MetadataValue.text(" x ".join(f"{d}={s}" for d, s in zip(image.dims, image.shape, strict=True))),
        "plate_dir": MetadataValue.path(str(plate_dir)),
        "source_digest": MetadataValue.text(str(digest)),
        "path": MetadataValue.path(f"{final}/{SDATA_FILE}"),
        **timer.metadata(),
    })


def _thumbnail(image, sample: str) -> bytes:
    """Max projection (3-D) of the first three channels, strided to at most ~512 px."""
    import numpy as np

    from ..previews import image_thumbnail

    arr = image.data
    step = max(1, int(np.ceil(max(arr.shape[-2:]) / 512)))
    arr = arr[..., ::step, ::step]
    if arr.ndim == 4:
        arr = arr.max(axis=1)
    return image_thumbnail(np.asarray(arr[:3]), title=sample)
