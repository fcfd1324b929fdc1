"""End to end: the whole graph on a synthetic plate, MLflow, checks, failures, and the UI's GraphQL API.

One session-scoped demo run per instance backend (the ``demo`` fixture of conftest.py,
``phenocoder_assets.cli.run_demo``: the sensor registers the wells, then every asset is materialized
in-process into a persistent instance) is shared by the tests below: on the embedded SQLite instance
and, when ``PHENOCODER_TEST_POSTGRES_URL`` is set (always in CI), on PostgreSQL.
Tests that materialize or launch runs work on their own copy of the demo's home (``own_demo``), so
no test sees another's runs; with pytest-xdist's ``--dist loadfile`` the file runs on one worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _instances import copy_home
from dagster import AssetKey, DagsterInstance, build_sensor_context

REPO = Path(__file__).resolve().parents[2]
PER_SAMPLE = ["sdata", "patches", "latents", "clusters", "graph_stats"]
CROSS_SAMPLE = ["model", "cluster_reference", "embedding", "well_profiles"]
EPOCHS = 3  # the demo fixture's training epochs (conftest.DEMO_EPOCHS)

pytestmark = pytest.mark.slow


@pytest.fixture
def instance(demo):
    with DagsterInstance.from_config(str(demo.dagster_home)) as inst:
        yield inst


@pytest.fixture
def own_demo(demo, tmp_path):
    """This test's own copy of the demo's home (for tests that materialize or launch runs)."""
    return copy_home(demo, tmp_path / "home")


@pytest.fixture
def own_instance(own_demo):
    with DagsterInstance.from_config(str(own_demo.dagster_home)) as inst:
        yield inst


def test_every_asset_and_partition_materialized(demo, instance):
    assert demo.samples == ["DEMO_A01", "DEMO_A02", "DEMO_A03"]
    assert sorted(instance.get_dynamic_partitions("samples")) == demo.samples
    for name in PER_SAMPLE:
        done = instance.get_materialized_partitions(AssetKey(name))
        assert done == set(demo.samples), name
        for sample in demo.samples:
            assert (demo.home / name / sample).is_dir()
    for name in CROSS_SAMPLE:
        assert instance.get_latest_materialization_event(AssetKey(name)) is not None, name
        assert (demo.home / name / "_").is_dir()
    assert not [p for p in demo.home.rglob(".stage-*")], "staging folders left behind"


def test_asset_checks_passed(demo, instance):
    from dagster import AssetCheckKey

    for asset, check in [("patches", "every_object_has_a_patch"), ("latents", "every_object_has_a_latent"),
                         ("latents", "latents_finite"), ("graph_stats", "graph_stats_complete")]:
        records = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(AssetKey(asset), check), limit=10)
        assert records and all(r.evaluation.passed for r in records), (asset, check)
        # the demo runs the wells as the sensor does, one plate run per stage: one check result over its wells
        covered = sum(int(r.evaluation.metadata["n_wells"].value) if "n_wells" in r.evaluation.metadata else 1
                      for r in records)
        assert covered == len(demo.samples), (asset, check)


def test_metadata_links_mlflow_and_records_model_version(demo, instance):
    model_event = instance.get_latest_materialization_event(AssetKey("model")).asset_materialization
    meta = model_event.metadata
    info = demo.mlflow
    assert meta["mlflow_run_id"].value == info["run_id"]
    assert info["run_id"] in meta["mlflow_run"].value
    assert "data:image/png;base64," in meta["curves"].value
    latents = instance.get_latest_materialization_event(AssetKey("latents")).asset_materialization.metadata
    assert latents["model_version"].value == str(info["version"])
    assert latents["model"].value == f"{info['registered_model_name']}/{info['version']}"


def test_mlflow_run_has_params_epoch_metrics_artifacts_and_registry(demo):
    import mlflow

    uri = f"sqlite:///{demo.home}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not MLflow's process-wide registry URI
    run = client.get_run(demo.mlflow["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["n_epochs"] == str(EPOCHS) and "n_latent_dim" in run.data.params
    assert run.data.tags["dagster.partition_set"] == ",".join(demo.samples)
    assert run.data.tags["dagster.run_id"] and run.data.tags["code_version"]
    for metric in ("loss", "reconstruction_loss", "kl_loss", "val_loss", "val_reconstruction_loss", "val_kl_loss",
                   "lr"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [h.step for h in history] == list(range(1, len(history) + 1)), metric
        assert 1 <= len(history) <= EPOCHS, metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.keras", "model_config.json", "normalization.json", "history.json", "history.png",
            "reconstructions.png"} <= artifacts
    assert str(demo.home / "mlartifacts") in run.info.artifact_uri
    name = demo.mlflow["registered_model_name"]
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(demo.mlflow["version"]) and champion.run_id == run.info.run_id
    import mlflow.keras

    import phenocoder_lib.models  # registers the Keras classes

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.keras.load_model(f"models:/{name}@champion")
    assert isinstance(loaded, phenocoder_lib.models.CVAE)
    assert not (REPO / "mlflow.db").exists() and not (REPO / "mlruns").exists()


def test_outputs_have_the_expected_content(demo):
    import anndata as ad

    stats = ad.read_h5ad(demo.home / "graph_stats" / "DEMO_A01" / "stats.h5ad")
    assert stats.n_obs == 1 and (stats.obs["status"] == "ok").all()
    emb = ad.read_h5ad(demo.home / "embedding" / "_" / "embedding.h5ad")
    assert list(emb.obs_names) == demo.samples and emb.obsm["X_umap"].shape == (3, 2)
    latents = ad.read_h5ad(demo.home / "latents" / "DEMO_A02" / "latents.h5ad")
    assert "spatial_message_passing" not in latents.layers  # the default: message passing off
    assert latents.uns["phenocoder_latents"]["model"].endswith(f"/{demo.mlflow['version']}")


def test_demo_prints_how_to_open_both_uis(demo):
    text = demo.printed
    assert f"DAGSTER_HOME={demo.dagster_home}" in text and "dagster dev" in text and "-h 127.0.0.1" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{demo.home}/mlflow.db --host 127.0.0.1" in text


def test_sensor_after_the_demo_requests_nothing(demo, instance):
    from phenocoder_assets.resources import PhenocoderStorage
    from phenocoder_assets.sensors import incoming_plates_sensor

    ctx = build_sensor_context(instance=instance, resources={"storage": PhenocoderStorage(root=str(demo.home))})
    result = incoming_plates_sensor(ctx)
    assert not result.run_requests and not result.dynamic_partitions_requests


def test_failed_run_leaves_the_previous_materialization_intact(own_demo, own_instance, monkeypatch):
    import anndata as ad
    from dagster import materialize

    from phenocoder_assets.definitions import ASSETS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    demo, instance = own_demo, own_instance
    sample = "DEMO_A03"
    target = demo.home / "graph_stats" / sample / "stats.h5ad"
    before_bytes = target.read_bytes()
    before_event = instance.get_latest_materialization_event(AssetKey("graph_stats"))
    original = ad.AnnData.write_h5ad

    def half_write(self, filename, *args, **kwargs):  # the step dies while writing its output
        Path(filename).write_bytes(b"\x89HDF half-written")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", half_write)
    resources = {"storage": PhenocoderStorage(root=str(demo.home)), "mlflow": MLflowTracking(root=str(demo.home))}
    res = materialize(ASSETS, selection=["graph_stats"], partition_key=sample, instance=instance,
                      resources=resources, raise_on_error=False)
    monkeypatch.setattr(ad.AnnData, "write_h5ad", original)
    assert not res.success
    assert target.read_bytes() == before_bytes
    assert not list((demo.home / "graph_stats").glob(".stage-*"))
    latest = instance.get_latest_materialization_event(AssetKey("graph_stats"))
    assert latest.run_id == before_event.run_id  # the failed run recorded no materialization
    mats = instance.fetch_materializations(AssetKey("graph_stats"), limit=100).records
    assert all(m.run_id != res.run_id for m in mats)
    assert ad.read_h5ad(target).n_obs == 1


def test_embedding_metadata_scores_the_planted_truth(own_demo, own_instance):
    """On a synthetic plate the embedding reports planted-truth scores; without ground truth, none and no failure."""
    from dagster import materialize

    from phenocoder_assets.definitions import ASSETS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    demo, instance = own_demo, own_instance
    meta = instance.get_latest_materialization_event(AssetKey("embedding")).asset_materialization.metadata
    for key in ("cell_type_ari", "cell_type_nmi", "treatment_loo_knn_accuracy"):
        value = meta[f"planted_truth/{key}"].value
        assert 0.0 <= value <= 1.0, (key, value)
    assert -1.0 <= meta["planted_truth/treatment_silhouette"].value <= 1.0
    assert meta["planted_truth/n_samples_with_truth"].value == len(demo.samples)

    resources = {"storage": PhenocoderStorage(root=str(demo.home)), "mlflow": MLflowTracking(root=str(demo.home))}
    run_config = {}  # the defaults, as the demo and the nightly schedule
    truth, hidden = demo.plate_dir / "ground_truth", demo.plate_dir / "ground_truth.hidden"
    truth.rename(hidden)  # the plate now looks like a real export
    try:
        res = materialize(ASSETS, selection=["embedding"], instance=instance, resources=resources,
                          run_config=run_config)
    finally:
        hidden.rename(truth)
    assert res.success
    meta = res.get_asset_materialization_events()[0].materialization.metadata
    assert not [k for k in meta if k.startswith("planted_truth/")]
    assert meta["n_samples"].value == len(demo.samples)


# --------------------------------------------------------------------------------------------------
# dagster-webserver on loopback: lineage through GraphQL, rerun of one latents partition
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webserver(own_demo):
    import requests

    demo = own_demo
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(demo.dagster_home), "PHENOCODER_HOME": str(demo.home)}
    exe = Path(sys.executable).with_name("dagster-webserver")
    proc = subprocess.Popen([str(exe), "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited: {proc.stdout.read().decode()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/server_info", timeout=5).ok:
                    break
            if time.time() > deadline:
                raise TimeoutError("dagster-webserver did not start within 120 s")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the webserver and its code server (same session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    import requests

    response = requests.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


LINEAGE = """{ assetNodes { assetKey { path } dependencyKeys { path } isPartitioned
               partitionDefinition { name } } }"""
LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message stack }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""
RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"""
MATERIALIZATIONS = """query($key: AssetKeyInput!, $p: [String!]) { assetOrError(assetKey: $key) {
  ... on Asset { assetMaterializations(partitions: $p, limit: 1) { runId partition
    metadataEntries { label ... on TextMetadataEntry { text } } } } } }"""


def test_webserver_lineage_and_latents_partition_rerun(own_demo, webserver):
    demo = own_demo
    nodes = {tuple(n["assetKey"]["path"]): n for n in _graphql(webserver, LINEAGE)["assetNodes"]}
    deps = {k[0]: sorted(d["path"][0] for d in n["dependencyKeys"]) for k, n in nodes.items()}
    assert deps == {
        "sdata": [], "patches": ["sdata"], "model": ["patches"], "latents": ["model", "patches", "sdata"],
        "cluster_reference": ["latents"], "clusters": ["cluster_reference", "latents"],
        "graph_stats": ["clusters", "latents"], "embedding": ["graph_stats", "latents"],
        "well_profiles": ["graph_stats", "latents"],
    }
    partitioned = {k[0] for k, n in nodes.items() if n["isPartitioned"]}
    assert partitioned == set(PER_SAMPLE)
    assert {nodes[(k,)]["partitionDefinition"]["name"] for k in partitioned} == {"samples"}

    sample = "DEMO_A02"
    before = _graphql(webserver, MATERIALIZATIONS, {"key": {"path": ["latents"]}, "p": [sample]})
    before_run = before["assetOrError"]["assetMaterializations"][0]["runId"]
    params = {
        "selector": {"repositoryLocationName": "phenocoder", "repositoryName": "__repository__",
                     "jobName": "sample_pipeline", "assetSelection": [{"path": ["latents"]}]},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": sample}]},
        "runConfigData": {"ops": {"latents": {"config": {"spatial_message_passing_radius": 30.0}}}},
    }
    launched = _graphql(webserver, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.time() + 300
    status = None
    while time.time() < deadline:
        status = _graphql(webserver, RUN_STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(2)
    assert status == "SUCCESS", status
    after = _graphql(webserver, MATERIALIZATIONS, {"key": {"path": ["latents"]}, "p": [sample]})
    mat = after["assetOrError"]["assetMaterializations"][0]
    assert mat["runId"] == run_id != before_run and mat["partition"] == sample
    entries = {e["label"]: e.get("text") for e in mat["metadataEntries"]}
    assert entries["model_version"] == str(demo.mlflow["version"])


def test_a_second_training_sits_beside_the_first_in_mlflow(own_demo, own_instance):
    """Retraining with other settings: a second run with the same metric names, version 2 becomes @champion."""
    import mlflow
    from dagster import materialize

    from phenocoder_assets.definitions import ASSETS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    demo, instance = own_demo, own_instance
    resources = {"storage": PhenocoderStorage(root=str(demo.home)), "mlflow": MLflowTracking(root=str(demo.home))}
    config = {"samples": demo.samples[:2], "n_epochs": 2, "n_latent_dim": 8, "n_dense_dim": 16,
              "conv_layers": [8, 16], "batch_size": 32, "plot": False}
    res = materialize(ASSETS, selection=["model"], instance=instance, resources=resources,
                      run_config={"ops": {"model": {"config": config}}})
    assert res.success
    uri = f"sqlite:///{demo.home}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not MLflow's process-wide registry URI
    experiment = client.get_experiment_by_name("phenocoder")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2
    first, second = runs
    assert second.data.params["n_latent_dim"] == "8" and first.data.params["n_latent_dim"] == "16"
    assert second.data.tags["dagster.partition_set"] == ",".join(demo.samples[:2])
    assert set(first.data.metrics) == set(second.data.metrics)
    assert len(client.get_metric_history(second.info.run_id, "val_loss")) == 2
    name = demo.mlflow["registered_model_name"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    meta = res.get_asset_materialization_events()[0].materialization.metadata
    assert meta["model_version"].value == "2" and meta["mlflow_run_id"].value == second.info.run_id
