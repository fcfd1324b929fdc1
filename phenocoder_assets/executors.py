"""Executor choice by configuration: one machine by default, Dask or Kubernetes by environment.

``PHENOCODER_EXECUTOR``
    ``multiprocess`` (default): one process per step, started from a forkserver that has already
    imported the heavy scientific stack (``preload_modules``), so each step does not pay the imports
    again; ``in_process``: everything in the run worker (debugging); ``dask``: steps on a
    ``dask.distributed`` cluster (``dagster-dask``); ``k8s``: one Kubernetes job per step
    (``dagster-k8s``, see ``deploy/``).
``PHENOCODER_EXECUTOR_CONFIG``
    Optional YAML file with the executor's configuration (for ``dask``: ``cluster: {existing:
    {address: tcp://scheduler:8786}}``; for ``k8s``: ``deploy/k8s/executor.yaml`` with the GPU
    for the ``model`` step). Run config (``execution: config: ...``) can override it per run.

The integrations are imported only when selected, so loading the definitions stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EXECUTOR_ENV = "PHENOCODER_EXECUTOR"
EXECUTOR_CONFIG_ENV = "PHENOCODER_EXECUTOR_CONFIG"

#: Modules the forkserver imports once for all step processes (TensorFlow is left out: it is only
#: needed by the model and latents steps, and a forked TensorFlow runtime is not safe).
PRELOAD_MODULES = ["phenocoder_assets.definitions", "anndata", "spatialdata"]


def _config_from_file() -> dict[str, Any]:
    path = os.environ.get(EXECUTOR_CONFIG_ENV)
    if not path:
        return {}
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{EXECUTOR_CONFIG_ENV}={path!r} must hold a YAML mapping of executor config.")
    return data


def select_executor(name: str | None = None) -> Any:
    """Return the executor named by ``name`` or ``$PHENOCODER_EXECUTOR`` (see the module docstring)."""
    from dagster import in_process_executor, multiprocess_executor

    name = (name or os.environ.get(EXECUTOR_ENV) or "multiprocess").strip().lower()
    config = _config_from_file()
    if name == "multiprocess":
        base = {"start_method": {"forkserver": {"preload_modules": PRELOAD_MODULES}}}
        return multiprocess_executor.configured({**base, **config})
    if name == "in_process":
        return in_process_executor.configured(config) if config else in_process_executor
    if name == "dask":
        from .dask_compat import dask_executor  # dagster-dask's executor, fixed for partitioned runs

        return dask_executor.configured(config) if config else dask_executor
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as err:  # pragma: no cover - only in a Kubernetes image
            raise ImportError(
                "PHENOCODER_EXECUTOR=k8s needs dagster-k8s (pip install 'phenocoder[k8s]') in the code image."
            ) from err
        return k8s_job_executor.configured(config) if config else k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={name!r} is not one of 'multiprocess', 'in_process', 'dask', 'k8s'.")
