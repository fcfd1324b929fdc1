"""The Phenocoder code location: ``defs`` (assets, checks, jobs, sensor, schedule, resources, executor).

Loaded by ``workspace.yaml`` (``dagster dev -w workspace.yaml``). Importing this module imports
Dagster and the asset modules only; TensorFlow, MLflow, SpatialData and scanpy are imported inside
the asset bodies, so the code location loads in about a second.
"""

from __future__ import annotations

from dagster import Definitions

from .assets.clusters import cluster_reference, clusters
from .assets.ingest import sdata
from .assets.latents import latents
from .assets.model import model
from .assets.patches import patches
from .assets.profiles import well_profiles
from .assets.spatial import embedding, graph_stats
from .executors import select_executor
from .jobs import refresh_summaries_job, sample_pipeline_job, train_model_job
from .refresh import refresh_stale_sensor
from .resources import MLflowTracking, PhenocoderStorage
from .schedules import nightly_refresh_schedule
from .sensors import incoming_plates_sensor

ASSETS = [sdata, patches, model, latents, cluster_reference, clusters, graph_stats, embedding, well_profiles]


def build_definitions(*, storage: PhenocoderStorage | None = None, mlflow: MLflowTracking | None = None,
                      executor=None) -> Definitions:
    """Build the project's :class:`~dagster.Definitions`; tests pass their own resources or executor."""
    return Definitions(
        assets=ASSETS,
        jobs=[sample_pipeline_job, train_model_job, refresh_summaries_job],
        sensors=[incoming_plates_sensor, refresh_stale_sensor],
        schedules=[nightly_refresh_schedule],
        resources={"storage": storage or PhenocoderStorage(), "mlflow": mlflow or MLflowTracking()},
        executor=executor if executor is not None else select_executor(),
    )


defs = build_definitions()
