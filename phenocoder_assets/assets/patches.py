"""``patches``: one patch per object of a well, normalization settings included (partitioned)."""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
)

from ..configs import PatchesConfig
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..state import SUMMARY, read_json
from ..wells import for_each_well, per_sample_asset
from ._common import (
    PREVIEW_FILE,
    SDATA_FILE,
    Timer,
    logical_version,
    preview_metadata,
    read_version,
    round_sig,
    settings_of,
    write_png,
    write_version,
)

CODE_VERSION = "1"

CHECK_EVERY_OBJECT = "every_object_has_a_patch"


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
    """One well of ``patches``."""
    import numpy as np
    import spatialdata

    from phenocoder_lib.patches import generate_dataset

    from ..configs import resolve_patch_size
    from ..previews import patch_montage
    from ..state import current_model_info

    patch_size = resolve_patch_size(config.patch_size, current_model_info(storage))
    inputs = {"sdata": read_version(storage, "sdata", sample)}
    version = logical_version(CODE_VERSION, {**settings_of(config), "patch_size": patch_size}, inputs)
    src = storage.local_path("sdata", sample)
    info = read_json(src / SUMMARY)
    timer = Timer()
    sd = spatialdata.read_zarr(src / SDATA_FILE)
    table = sd.tables[info["table_key"]]
    png = None
    with storage.stage("patches", sample) as out:
        with timer.phase("extract"):
            ds = generate_dataset(
                sd, dataset=sample, dir_dataset=out.parent, table_key=info["table_key"],
                sample_key=info["sample_key"], image_key=info["image_key"], patch_size=patch_size,
                spatial_key_index=config.spatial_key_index, scale=config.scale,
                scale_percentile=config.scale_percentile, scale_per_sample=config.scale_per_sample,
                metadata_keys=config.metadata_keys or None, n_patches=config.n_patches, seed=config.seed,
            )
        n = len(ds.index)
        if n:
            png = patch_montage(ds.read(sample, rows=np.arange(min(16, n))), title=f"{sample}: first patches")
            write_png(out / PREVIEW_FILE, png)
        settings = ds.settings
        data_version = write_version(out, version, inputs)
    expected = set(table.obs_names.astype(str))
    have = set(ds.index["obs_name"].astype(str))
    missing = sorted(expected - have)
    final = storage.url("patches", sample)
    norm = settings["normalization"]
    anchors = norm["per_sample"].get(sample) if norm["scale_per_sample"] else norm["global"]
    return MaterializeResult(
        data_version=data_version,
        metadata={
            **preview_metadata(png, f"{sample}: patches", final),
            "n_patches": MetadataValue.int(n),
            "n_padded": MetadataValue.int(int(settings["n_padded"])),
            "patch_size": MetadataValue.text("x".join(map(str, settings["patch_size"]))),
            "channels": MetadataValue.text(", ".join(settings["channels"])),
            "anchors": MetadataValue.text(_anchor_text(settings["channels"], anchors)),
            "path": MetadataValue.path(final),
            **timer.metadata(),
        },
        check_results=[AssetCheckResult(
            check_name=CHECK_EVERY_OBJECT,
            passed=not missing,
            severity=AssetCheckSeverity.WARN if config.n_patches is not None else AssetCheckSeverity.ERROR,
            metadata={"n_objects": len(expected), "n_patches": n, "n_missing": len(missing),
                      "missing_examples": MetadataValue.text(", ".join(missing[:10]))},
        )],
    )


def _anchor_text(channels: list[str], anchors: dict | None) -> str:
    """``"C01 0-214, C02 0-252"``: each channel's low and high normalization anchor (4 significant digits)."""
    if not anchors:
        return "none (patches not scaled)"
    low, high = anchors.get("low", []), anchors.get("high", [])
    return ", ".join(f"{c} {round_sig(lo):g}-{round_sig(hi):g}" for c, lo, hi in zip(channels, low, high, strict=False))
