"""The Phenocoder code location: ``defs`` (assets, checks, jobs, sensor, schedule, resources, executor).

Loaded by ``workspace.yaml`` (``dagster dev -w workspace.yaml``). Importing this module imports
Dagster and the asset modules only; TensorFlow, MLflow, SpatialData and scanpy are imported inside
the asset bodies, so the code location loads in about a second.
"""

from __future__ import annotations

import warnings

from dagster import Definitions

with warnings.catch_warnings():  # backfill_policy= on @asset is marked beta in this Dagster release
    warnings.filterwarnings("ignore", message=".*backfill_policy.*")
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

#: Concurrency pools of the heavy stages (``pool=`` on the assets) and their limits on one machine:
#: TensorFlow (training, encoding) one step at a time, reading and patching plates two at a time.
#: Dagster enforces them once the instance holds the limits (:func:`apply_pool_limits`, or
#: ``dagster instance concurrency set gpu 1``, or ``concurrency: pools:`` in ``dagster.yaml``); a
#: pool without a limit is not capped.
POOL_LIMITS = {"gpu": 1, "ingest": 2}


def apply_pool_limits(instance, limits: dict[str, int] | None = None) -> dict[str, int]:
    """Store the pool limits (default :data:`POOL_LIMITS`) in ``instance``; returns what was set."""
    limits = dict(POOL_LIMITS if limits is None else limits)
    for pool, slots in limits.items():
        if not isinstance(slots, int) or slots < 1:
            raise ValueError(f"limit of pool {pool!r} is {slots!r}; give a whole number of concurrent steps >= 1.")
        instance.event_log_storage.set_concurrency_slots(pool, slots)
    return limits


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
