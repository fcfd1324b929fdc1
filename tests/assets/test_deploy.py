"""Scale-out is configuration: the shipped deployment files parse and match what the code expects."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# Top-level fields of dagster-k8s 0.29's k8s_job_executor and of its per-step k8s config
# (checked against the real schema below when dagster-k8s is installed).
K8S_EXECUTOR_FIELDS = {
    "enable_owner_references", "env_config_maps", "env_secrets", "env_vars", "image_pull_policy",
    "image_pull_secrets", "job_image", "job_namespace", "kubeconfig_file", "labels", "load_incluster_config",
    "max_concurrent", "per_step_k8s_config", "resources", "retries", "scheduler_name", "security_context",
    "service_account_name", "step_dependency_config", "step_k8s_config", "tag_concurrency_limits",
    "volume_mounts", "volumes",
}
STEP_K8S_FIELDS = {"container_config", "job_config", "job_metadata", "job_spec_config", "merge_behavior",
                   "pod_spec_config", "pod_template_spec_metadata"}
HELM_TOP_LEVEL = {"global", "dagsterWebserver", "dagster-user-deployments", "runLauncher", "dagsterDaemon",
                  "concurrency", "postgresql", "ingress", "computeLogManager", "pythonLogs", "serviceAccount",
                  "rbacEnabled", "retention", "scheduler", "telemetry", "imagePullSecrets", "redis", "rabbitmq",
                  "flower", "generatePostgresqlPasswordSecret", "busybox", "migrate", "nameOverride",
                  "fullnameOverride", "dagsterHome", "postgresqlSecretName"}


def _load(path: str):
    return yaml.safe_load((DEPLOY / path).read_text())


def test_helm_values_k8s_run_launcher_and_code_location():
    values = _load("helm/values.yaml")
    assert set(values) <= HELM_TOP_LEVEL, set(values) - HELM_TOP_LEVEL
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert set(values["runLauncher"]["config"]) == {"k8sRunLauncher"}
    deployment = values["dagster-user-deployments"]["deployments"][0]
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == "phenocoder_assets.definitions"
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["PHENOCODER_EXECUTOR"] == "k8s"
    mounts = {m["name"]: m["mountPath"] for m in deployment["volumeMounts"]}
    assert env["PHENOCODER_EXECUTOR_CONFIG"] == f"{mounts['executor-config']}/executor.yaml"
    assert env["PHENOCODER_LANDING"] == mounts["landing"]
    assert env["PHENOCODER_HOME"].startswith("s3://")
    assert values["dagsterWebserver"]["service"]["type"] == "ClusterIP"
    # one training run at a time: the tag the train_model job carries
    from phenocoder_assets.jobs import train_model_job

    limits = values["concurrency"]["runs"]["tagConcurrencyLimits"]
    gpu = [lim for lim in limits if lim["key"] in train_model_job.tags]
    assert gpu and gpu[0]["value"] == train_model_job.tags[gpu[0]["key"]] and gpu[0]["limit"] == 1
    assert values["concurrency"]["pools"]["granularity"] == "op"
    assert not values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"].get("tagConcurrencyLimits")


def test_k8s_executor_config_gives_the_model_step_a_gpu():
    config = _load("k8s/executor.yaml")
    assert set(config) <= K8S_EXECUTOR_FIELDS, set(config) - K8S_EXECUTOR_FIELDS
    steps = config["per_step_k8s_config"]
    from phenocoder_assets.definitions import defs

    step_keys = {n.name for n in defs.resolve_implicit_global_asset_job_def().graph.node_defs}
    assert set(steps) <= step_keys, f"per-step config for unknown steps: {set(steps) - step_keys}"
    for step in [config["step_k8s_config"], *steps.values()]:
        assert set(step) <= STEP_K8S_FIELDS
    resources = steps["model"]["container_config"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in config["step_k8s_config"]["container_config"]["resources"]["limits"]


def test_k8s_executor_config_against_dagster_k8s_schema():
    k8s = pytest.importorskip("dagster_k8s", reason="dagster-k8s is only in the Kubernetes image")
    from dagster._config import process_config

    result = process_config(k8s.k8s_job_executor.config_schema.config_type, _load("k8s/executor.yaml"))
    assert result.success, [e.message for e in result.errors]


def test_gpu_pool_job_sets_the_pool_the_model_declares():
    job = _load("k8s/gpu-pool-job.yaml")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["dagster", "instance", "concurrency", "set"]
    from phenocoder_assets.assets.model import model

    assert command[4] == model.op.pool == "gpu"
    assert command[5] == "1"


def test_dask_executor_config_validates():
    from dagster._config import process_config
    from dagster_dask import dask_executor

    result = process_config(dask_executor.config_schema.config_type, _load("dask/executor.yaml"))
    assert result.success, [e.message for e in result.errors]


def test_local_instance_config_loads(tmp_path):
    from dagster import DagsterInstance

    (tmp_path / "dagster.yaml").write_text((DEPLOY / "local" / "dagster.yaml").read_text())
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
    assert config.run_queue_config.max_concurrent_runs == 2
    assert config.run_queue_config.tag_concurrency_limits == [{"key": "phenocoder/gpu", "value": "true", "limit": 1}]


@pytest.mark.parametrize("name", ["multiprocess", "in_process", "dask"])
def test_executor_selection(name, monkeypatch):
    from phenocoder_assets.executors import select_executor

    monkeypatch.setenv("PHENOCODER_EXECUTOR_CONFIG", str(DEPLOY / "dask" / "executor.yaml")) if name == "dask" \
        else monkeypatch.delenv("PHENOCODER_EXECUTOR_CONFIG", raising=False)
    executor = select_executor(name)
    assert executor.name in {"multiprocess", "in_process", "dask"}


def test_unknown_executor_is_refused():
    from phenocoder_assets.executors import select_executor

    with pytest.raises(ValueError, match="not one of"):
        select_executor("spark")
