"""``patches``: one patch per object of a well, normalization settings included (partitioned)."""

from dagster import AssetCheckSpec, AssetExecutionContext, MaterializeResult

from ..configs import PatchesConfig
from ..metadata import CHECK_EVERY_OBJECT
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import SDATA_FILE, logical_version, read_version, settings_of, write_version

CODE_VERSION = "1"


@per_sample_asset(
    deps=["sdata"],
    kinds={"zarr", "parquet"},
    code_version=CODE_VERSION,
    check_specs=(AssetCheckSpec(CHECK_EVERY_OBJECT, asset="patches",
                                description="Every object of the well's table has a patch."),),
    pool='ingest',
    description=describe("patches", "Patch dataset of one well (`<root>/patches/<sample>/`: `patches.zarr`, "
                         "`index.parquet`, `stats.parquet`, `settings.json` with the normalization anchors)."),
)
def patches(context: AssetExecutionContext, config: PatchesConfig, storage: PhenocoderStorage):
    """:func:`phenocoder_lib.patches.generate_dataset` on the well's SpatialData."""
    yield from for_each_well(context, lambda sample: _patches_one(context, config, storage, sample),
                             upstream=('sdata',))


def _patches_one(context: AssetExecutionContext, config: PatchesConfig, storage: PhenocoderStorage,
                 sample: str) -> MaterializeResult:
    """One well of ``patches`` (:func:`phenocoder_lib.pipeline.extract_patches`)."""
    from phenocoder_lib.pipeline import extract_patches

    from ..configs import resolve_patch_size
    from ..metadata import patches_result
    from ..state import SUMMARY, current_model_info, read_json

    settings = {**settings_of(config), "patch_size": resolve_patch_size(config.patch_size, current_model_info(storage))}
    inputs = {"sdata": read_version(storage, "sdata", sample)}
    version = logical_version(CODE_VERSION, settings, inputs)
    src = storage.local_path("sdata", sample)
    info = read_json(src / SUMMARY)
    with storage.stage("patches", sample) as out:
        extracted = extract_patches(src / SDATA_FILE, out, table_key=info["table_key"],
                                    sample_key=info["sample_key"], image_key=info["image_key"], **settings)
        data_version = write_version(out, version, inputs)
        result = patches_result(extracted, out, storage.url("patches", sample), data_version,
                                subset=config.n_patches is not None)
    return result
