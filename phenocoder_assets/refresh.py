"""Bring everything that is out of date up to date in one action: the ``refresh_stale`` sensor.

Every asset reports a data version derived from what it wrote (see ``assets/_common.py``), so
Dagster's stale status says exactly which partitions were computed from data that has since
changed. This sensor asks Dagster for the stale status of every per-sample partition and requests,
per stale well, one ``sample_pipeline`` run of the stale stages and every stage after them (their
inputs are about to change too); once no per-sample partition is stale or running, it requests the
``embedding`` if that is stale. Runs use the stage defaults of :mod:`phenocoder_assets.configs`
(new patches with the current model's settings, as the landing-folder sensor does).

``model`` and ``cluster_reference`` are never retrained by it: they turn STALE whenever a new
well arrives (they fan in over every well), and retraining changes every downstream partition, so
it stays a deliberate action. The sensor logs when they are stale.

The sensor is stopped by default: start it (UI: Automation -> ``refresh_stale``, or
``dagster sensor start refresh_stale``) to keep the platform up to date continuously, or open it and
click "Test sensor" -> "Launch all runs" for one refresh. Partitions of runs still queued or running
are left for a later tick; run keys name the data versions they refresh, so the same stale state is
never requested twice.
"""

from __future__ import annotations

from typing import Any

from dagster import (
    AssetKey,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContext

from .jobs import refresh_summaries_job, sample_pipeline_job
from .partitions import SAMPLES
from .resources import PhenocoderStorage

#: The per-sample chain in dependency order (a stale stage makes every later one stale once it reruns).
CHAIN = ("sdata", "patches", "latents", "clusters", "graph_stats")
#: Unpartitioned assets the sensor refreshes; ``model`` and ``cluster_reference`` are deliberate.
SUMMARIES = ("embedding",)
DELIBERATE = ("model", "cluster_reference")
IN_PROGRESS = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
               DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


class _Loading(LoadingContext):
    """The request scope Dagster's stale-status resolver batches its queries in."""

    def __init__(self, instance) -> None:
        self._instance = instance
        self._loaders: dict = {}

    @property
    def instance(self):
        return self._instance

    @property
    def loaders(self) -> dict:
        return self._loaders


def stale_resolver(instance, asset_graph) -> CachingStaleStatusResolver:
    """Dagster's resolver of STALE / FRESH / MISSING (the one behind GraphQL ``staleStatus``)."""
    return CachingStaleStatusResolver(instance, asset_graph, _Loading(instance))


def stale_stages(resolver: CachingStaleStatusResolver, sample: str) -> list[str]:
    """The stages of ``sample`` to rematerialize: the first STALE one and every later materialized one."""
    statuses = [resolver.get_status(AssetKey(a), sample) for a in CHAIN]
    if StaleStatus.STALE not in statuses:
        return []
    first = statuses.index(StaleStatus.STALE)
    return [a for a, s in zip(CHAIN[first:], statuses[first:], strict=True) if s != StaleStatus.MISSING]


def embedding_inputs_changed(storage: PhenocoderStorage) -> bool:
    """Whether the graph_stats folders now differ from those the embedding recorded reading.

    Dagster stops comparing partition versions of a fan-in dependency from 100 upstream partitions
    on; the versions recorded in the folders cover any number of wells.
    """
    from .assets._common import VERSION_FILE, read_version
    from .state import read_json

    if not storage.exists("embedding"):
        return False
    path = storage.local_path("embedding") / VERSION_FILE
    recorded = read_json(path).get("inputs", {}) if path.exists() else {}
    current = {f"graph_stats/{s}": read_version(storage, "graph_stats", s) for s in storage.partitions("graph_stats")}
    return recorded != current


def refresh_plan(instance, asset_graph, samples: list[str] | None = None,
                 busy: set[str] | None = None, storage: PhenocoderStorage | None = None) -> dict[str, Any]:
    """What is stale now: ``{"samples": {sample: stages}, "summaries": [...], "deliberate": [...]}``.

    ``busy`` partitions (with runs in flight) are left out; summaries are only planned when no
    per-sample stage is stale or running.
    """
    resolver = stale_resolver(instance, asset_graph)
    busy = busy or set()
    keys = samples if samples is not None else list(instance.get_dynamic_partitions(SAMPLES))
    per_sample = {}
    for sample in sorted(keys):
        if sample in busy:
            continue
        stages = stale_stages(resolver, sample)
        if stages:
            per_sample[sample] = stages
    summaries = [] if per_sample or busy else \
        [a for a in SUMMARIES if resolver.get_status(AssetKey(a)) == StaleStatus.STALE
         or (a == "embedding" and storage is not None and embedding_inputs_changed(storage))]
    deliberate = [a for a in DELIBERATE if resolver.get_status(AssetKey(a)) == StaleStatus.STALE]
    versions = {f"{a}/{s}": resolver.get_current_data_version(AssetKey(a), s).value
                for s, stages in per_sample.items() for a in CHAIN}
    for a in (*SUMMARIES, *DELIBERATE):
        versions[a] = resolver.get_current_data_version(AssetKey(a)).value
    return {"samples": per_sample, "summaries": summaries, "deliberate": deliberate, "versions": versions}


def busy_partitions(instance) -> set[str]:
    """Partitions of runs queued or in flight (``"*"`` for an unpartitioned run)."""
    records = instance.get_run_records(filters=RunsFilter(statuses=IN_PROGRESS))
    return {r.dagster_run.tags.get("dagster/partition", "*") for r in records}


def _latest_storage_id(instance, asset: str) -> str:
    records = instance.fetch_materializations(AssetKey(asset), limit=1, ascending=False).records
    return str(records[0].storage_id) if records else "none"


def run_key(sample_or_asset: str, stages: list[str], versions: dict[str, str]) -> str:
    """``refresh:<what>:<digest of the current data versions>``: one request per stale state."""
    from .assets._common import digest

    return f"refresh:{sample_or_asset}:{digest(stages, sorted(versions.items()))}"


@sensor(
    jobs=[sample_pipeline_job, refresh_summaries_job],
    minimum_interval_seconds=120,
    default_status=DefaultSensorStatus.STOPPED,
    description="Brings every STALE partition up to date: per well, the stale stages and those after them "
    "(sample_pipeline), then the embedding. Never retrains the model or the cluster reference.",
)
def refresh_stale_sensor(context: SensorEvaluationContext, storage: PhenocoderStorage):
    """See the module docstring."""
    from .sensors import patches_run_config
    from .state import current_model_info

    if context.repository_def is not None:
        asset_graph = context.repository_def.asset_graph
    else:  # evaluated outside a code location (a script or test without definitions)
        from .definitions import defs

        asset_graph = defs.resolve_asset_graph()
    busy = busy_partitions(context.instance)
    plan = refresh_plan(context.instance, asset_graph, busy=busy - {"*"}, storage=storage)
    if "*" in busy:  # an unpartitioned run (training, reference, embedding) in flight: the summaries wait
        plan["summaries"] = []
    for name in plan["deliberate"]:
        context.log.info(f"{name} is STALE (its inputs changed since it was built); retrain it deliberately if the "
                         "new wells should shape it -- this sensor leaves it as it is.")
    model = current_model_info(storage)
    shared = {a: plan["versions"][a] for a in DELIBERATE}
    requests = []
    for sample, stages in plan["samples"].items():
        mine = {**shared, **{f"{a}/{sample}": plan["versions"][f"{a}/{sample}"] for a in CHAIN}}
        requests.append(RunRequest(
            job_name=sample_pipeline_job.name,
            run_key=run_key(sample, stages, mine),
            partition_key=sample,
            asset_selection=[AssetKey(a) for a in stages],
            run_config=patches_run_config(model) if "patches" in stages else {},
            tags={"phenocoder/trigger": "refresh_stale"},
        ))
    for name in plan["summaries"]:
        # the newest materializations it fans in over name the state it is refreshed from
        latest = {a: _latest_storage_id(context.instance, a) for a in ("graph_stats", "latents", name)}
        requests.append(RunRequest(job_name=refresh_summaries_job.name,
                                   run_key=run_key(name, [name], {**shared, **latest}),
                                   asset_selection=[AssetKey(name)], tags={"phenocoder/trigger": "refresh_stale"}))
    if not requests:
        waiting = f" ({len(busy)} partition(s) with runs in flight)" if busy else ""
        return SkipReason("nothing stale" + waiting)
    return SensorResult(run_requests=requests)
