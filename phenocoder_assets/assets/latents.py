"""``latents``: deterministic latents (z_mean) of every object of a well with the current model."""

from dagster import AssetCheckSpec, AssetExecutionContext, MaterializeResult

from ..configs import LatentsConfig
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset
from ._common import Timer, logical_version, read_version, settings_of
from ._model_impl import CHECK_EVERY_OBJECT, CHECK_FINITE

CODE_VERSION = "1"
#: Settings that do not change the latents (left out of the data version): the encoding batch size.
COSMETIC = ("batch_size",)

__all__ = ["CHECK_EVERY_OBJECT", "CHECK_FINITE", "CODE_VERSION", "COSMETIC", "latents"]


@per_sample_asset(
    deps=["patches", "model", "sdata"],
    kinds={"anndata", "tensorflow"},
    code_version=CODE_VERSION,
    check_specs=(
        AssetCheckSpec(CHECK_EVERY_OBJECT, asset="latents", description="Every object of the well has a latent."),
        AssetCheckSpec(CHECK_FINITE, asset="latents", description="No NaN or infinite latent value."),
    ),
    pool="gpu",  # the TensorFlow stage shares the training's pool: one at a time unless the instance allows more
    description=describe("latents", "Latents of one well (`<root>/latents/<sample>/latents.h5ad`: the "
                         "'phenocoder' table, `z_mean` per object, optional spatial message passing layer), with "
                         "the model version that encoded them."),
)
def latents(context: AssetExecutionContext, config: LatentsConfig, storage: PhenocoderStorage):
    """Encode the well's objects with the current model (library ``pipeline.encode_well``)."""
    yield from for_each_well(context, lambda sample: _latents_one(context, config, storage, sample),
                             upstream=("sdata", "patches"))


def _latents_one(context: AssetExecutionContext, config: LatentsConfig, storage: PhenocoderStorage,
                 sample: str) -> MaterializeResult:
    from pathlib import Path

    from phenocoder_lib.pipeline import encode_well

    from ._model_impl import latents_result, load_current_model, read_well

    # what this partition is computed from: the well, its patch dataset (normalization anchors) and the model
    inputs = {"sdata": read_version(storage, "sdata", sample), "patches": read_version(storage, "patches", sample),
              "model": read_version(storage, "model")}
    version = logical_version(CODE_VERSION, settings_of(config, COSMETIC), inputs)
    timer = Timer()
    with timer.phase("load_model"):
        trained, info = load_current_model(storage)
    sdata, keys = read_well(storage, sample)
    with timer.phase("encode"):
        encoded = encode_well(trained, sdata, sample, keys=keys, spatial_key=config.spatial_key,
                              batch_size=config.batch_size,
                              spatial_message_passing_radius=config.spatial_message_passing_radius,
                              data_dir=Path(storage.root_url) / "patches" if storage.is_local else None)
    return latents_result(context, config, storage, sample, encoded, info, version, inputs, timer, keys)
