"""``latents``: deterministic latents (z_mean) of every object of a well with the current model."""

from dagster import AssetCheckSpec, AssetExecutionContext

from ..configs import LatentsConfig
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ..wells import for_each_well, per_sample_asset

CHECK_EVERY_OBJECT = "every_object_has_a_latent"
CHECK_FINITE = "latents_finite"
CODE_VERSION = "1"
#: Settings that do not change the latents (left out of the data version): the encoding batch size.
COSMETIC = ("batch_size",)


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
    """Encode the well's patch dataset with the current model (library ``encoding``)."""
    from ._model_impl import encode_sample

    yield from for_each_well(context, lambda sample: encode_sample(context, config, storage, sample),
                             upstream=("sdata", "patches"))
