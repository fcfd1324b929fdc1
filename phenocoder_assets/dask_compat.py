"""The dagster-dask executor, made to work for partitioned runs with current dask.

``dagster_dask.dask_executor`` (0.29.27) passes the ``DagsterRun`` to ``Client.submit`` as a plain
argument. dask >= 2024.12 parses task arguments and recurses into tuples, hence into Dagster's
named-tuple records; a run of a dynamic partition carries a ``KeyRangesPartitionsSubset`` record,
which forbids iteration, so every partitioned run fails before its first step with
``Iteration is not allowed on @record KeyRangesPartitionsSubset``. This executor is the same
executor (same config schema, same worker function ``query_on_dask_worker``) with the arguments
wrapped in an opaque object that dask does not traverse. It supports the ``existing`` and
``local`` cluster types; the others fall back to the stock implementation.
"""

from __future__ import annotations

from typing import Any

from dagster import executor
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster_dask.executor import (
    DaskExecutor,
    get_dask_resource_requirements,
    query_on_dask_worker,
)
from dagster_dask.executor import (
    dask_executor as _stock_dask_executor,
)


class _Opaque:
    """Holds the step arguments; dask passes objects that are not collections through untouched."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args


def _execute_step_on_worker(dependencies: Any, payload: _Opaque) -> Any:
    return query_on_dask_worker(dependencies, *payload.args)


class PartitionSafeDaskExecutor(DaskExecutor):
    """:class:`dagster_dask.executor.DaskExecutor` whose task arguments survive dask's parser."""

    def execute(self, plan_context, execution_plan):  # noqa: D102
        if self.cluster_type not in ("existing", "local"):
            yield from super().execute(plan_context, execution_plan)
            return
        import dask.distributed
        from dagster._core.errors import raise_execution_interrupts
        from dagster._utils import iterate_with_context

        if not plan_context.instance.is_persistent:
            raise ValueError("Dask execution needs a persistent DagsterInstance (DAGSTER_HOME), not an ephemeral one.")
        job_name = plan_context.job_name
        if self.cluster_type == "existing":
            cluster: Any = self.cluster_configuration["address"]
        else:
            cluster = dask.distributed.LocalCluster(**self.build_dict(job_name))
        instance_ref = plan_context.instance.get_ref()
        with dask.distributed.Client(cluster) as client:
            futures: dict[str, Any] = {}
            for level in execution_plan.get_steps_to_execute_by_level():
                for step in level:
                    dependencies = [futures[key] for step_input in step.step_inputs
                                    for key in step_input.dependency_keys]
                    payload = _Opaque(plan_context.reconstructable_job, plan_context.dagster_run,
                                      plan_context.run_config, [step.key], instance_ref,
                                      execution_plan.known_state)
                    futures[step.key] = client.submit(
                        _execute_step_on_worker, dependencies, payload, key=f"{job_name}.{step.key}",
                        resources=get_dask_resource_requirements(step.tags), pure=False,
                    )
            completed = dask.distributed.as_completed(list(futures.values()), with_results=True)
            for _future, events in iterate_with_context(raise_execution_interrupts, completed):
                yield from events
        if self.cluster_type == "local":
            cluster.close()


@executor(
    name="dask",
    config_schema=_stock_dask_executor.config_schema,
    requirements=multiple_process_executor_requirements(),
)
def dask_executor(init_context):
    """``dagster_dask.dask_executor`` with partitioned runs fixed (see the module docstring)."""
    ((cluster_type, cluster_configuration),) = init_context.executor_config["cluster"].items()
    return PartitionSafeDaskExecutor(cluster_type, cluster_configuration)
