"""``model``: the CVAE trained on the patch datasets of chosen samples, tracked in MLflow (unpartitioned)."""

from dagster import AllPartitionMapping, AssetDep, AssetExecutionContext, MaterializeResult, asset

from ..configs import ModelConfig
from ..metadata_docs import describe
from ..resources import MLflowTracking, PhenocoderStorage

CODE_VERSION = "2"  # 2: one seeded chunk-window batch order (the same in RAM or streamed); a retrain differs


@asset(
    deps=[AssetDep("patches", partition_mapping=AllPartitionMapping())],
    group_name="cross_sample",
    kinds={"keras", "tensorflow", "mlflow"},
    code_version=CODE_VERSION,
    pool="gpu",
    description=describe("model", "Model trained on the patch datasets of the chosen samples "
                         "(`<root>/model/_/model.keras`); one MLflow run per training, named "
                         "`model <samples> (<Dagster run id>)` and tagged with the Dagster run id, registered in "
                         "the MLflow model registry. Retraining is a deliberate action."),
)
def model(context: AssetExecutionContext, config: ModelConfig, storage: PhenocoderStorage,
          mlflow: MLflowTracking) -> MaterializeResult:
    """Train (library ``training``), log to MLflow, register, write atomically."""
    from ._model_impl import train_and_track

    return train_and_track(context, config, storage, mlflow)
