"""Lineage stays true: data versions, STALE/FRESH over GraphQL and the Python API, and the refresh sensor.

One small synthetic plate (3 wells) goes through the whole graph with ``phenocoder demo`` into an
instance on SQLite and, when ``PHENOCODER_TEST_POSTGRES_URL`` is set, on PostgreSQL, once per module;
each test works on its own copy of that home (files, instance database, MLflow store), so the tests
do not depend on each other or on their order: an identical rerun of ``latents`` leaves everything
FRESH; another ``spatial_message_passing_radius`` for one well makes exactly that well's clusters
and graph_stats and the fan-in assets STALE; going back to the old settings is FRESH again; and
the ``refresh_stale`` sensor brings everything up to date.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from _instances import BACKENDS, copy_home, write_instance
from dagster import AssetKey, DagsterInstance, SkipReason, build_sensor_context, materialize

REPO = Path(__file__).resolve().parents[2]
CHAIN = ["sdata", "patches", "latents", "clusters", "graph_stats"]
SUMMARIES = ["model", "cluster_reference", "embedding"]
RADIUS = {"ops": {"latents": {"config": {"spatial_message_passing_radius": 30.0}}}}



def test_versions_are_digests_of_content_and_settings():
    import numpy as np

    from phenocoder_assets.assets._common import array_digest, digest, logical_version, settings_of
    from phenocoder_assets.configs import GraphStatsConfig, LatentsConfig, resolve_patch_size

    a = np.arange(6, dtype=np.float32)
    assert array_digest([a]) == array_digest([a.copy()]) != array_digest([a.reshape(2, 3)])
    assert array_digest([a]) != array_digest([a.astype(np.float64)])
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})
    base = logical_version("1", settings_of(LatentsConfig(), ["batch_size"]), {"model": "m1"})
    assert base == logical_version("1", settings_of(LatentsConfig(batch_size=7), ["batch_size"]), {"model": "m1"})
    assert base != logical_version(
        "1", settings_of(LatentsConfig(spatial_message_passing_radius=30.0), ["batch_size"]), {"model": "m1"})
    assert base != logical_version("1", settings_of(LatentsConfig(), ["batch_size"]), {"model": "m2"})
    assert base != logical_version("2", settings_of(LatentsConfig(), ["batch_size"]), {"model": "m1"})
    assert "n_jobs" not in settings_of(GraphStatsConfig(), ["n_jobs"])
    assert resolve_patch_size(None, None) == [128, 128]
    assert resolve_patch_size(None, {"patches": {"patch_size": [32, 32]}}) == [32, 32]
    assert resolve_patch_size([16, 24], {"patches": {"patch_size": [32, 32]}}) == [16, 24]


def test_defaults_live_in_the_config_classes():
    """The demo's stages, the sensor, the schedule and an empty UI launch read the same defaults."""
    from phenocoder_assets.configs import ClusterReferenceConfig, EmbeddingConfig, LatentsConfig, PatchesConfig

    assert LatentsConfig().spatial_message_passing_radius is None
    assert ClusterReferenceConfig().resolution == 0.5 and EmbeddingConfig().n_dim == 32
    assert PatchesConfig().patch_size is None  # the current model's patch size


def test_the_demo_passes_only_what_its_command_line_sets(tmp_path, monkeypatch):
    """The demo's run configs, captured without running them: every other setting is a config default."""
    import dagster

    from phenocoder_assets.cli import run_demo
    from phenocoder_assets.configs import DEMO_MODEL

    calls = []

    class Done:
        success, run_id = True, "captured"

        @staticmethod
        def get_asset_check_evaluations():
            return []

    def capture(assets, selection, partition_key=None, run_config=None, tags=None, **_):
        calls.append((tuple(selection), partition_key, run_config["ops"], tags or {}))
        return Done()

    monkeypatch.setattr(dagster, "materialize", capture)
    monkeypatch.setenv("DAGSTER_HOME", str(write_instance(tmp_path / "instance", "sqlite")))
    run_demo(tmp_path / "home", wells=2, epochs=1, patch_size=16, image_size=64, nuclei_per_well=10, quiet=True)
    ops = {sel: cfg for sel, _, cfg, _ in calls}
    # the wells' stages run as the sensor runs them: one plate run over the range of the plate's wells
    for sel, partition, _, tags in calls:
        if sel in {("sdata", "patches"), ("latents",), ("clusters", "graph_stats")}:
            assert partition is None and tags["phenocoder/plate_run"] == tags["phenocoder/plate"] == "DEMO", sel
            assert (tags["dagster/asset_partition_range_start"], tags["dagster/asset_partition_range_end"]) == (
                "DEMO_A01", "DEMO_A02"), sel
    assert len(calls) == 7
    assert ops[("sdata", "patches")] == {"patches": {"config": {"patch_size": [16, 16]}}}
    assert ops[("model",)]["model"]["config"] == {**DEMO_MODEL, "samples": ["DEMO_A01", "DEMO_A02"], "n_epochs": 1,
                                                  "early_stopping_patience": 5, "seed": 0}
    for selection in [("latents",), ("cluster_reference",), ("clusters", "graph_stats"), ("embedding",)]:
        assert ops[selection] == {}, selection


@pytest.fixture(scope="module", params=BACKENDS)
def demo_home(request, tmp_path_factory):
    """The demo (3 wells, 2 epochs, 16-px patches) in an instance of the parametrized backend."""
    from phenocoder_assets.cli import run_demo

    home = tmp_path_factory.mktemp(f"lineage-{request.param}") / "home"
    dagster_home = write_instance(home / "instance", request.param)
    saved = {k: os.environ.get(k) for k in ("PHENOCODER_HOME", "DAGSTER_HOME")}
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    try:
        yield run_demo(home, wells=3, epochs=2, patch_size=16, image_size=128, nuclei_per_well=50, quiet=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def plate(demo_home, tmp_path):
    """This test's own copy of the demo's home."""
    return copy_home(demo_home, tmp_path / "home")


@pytest.fixture
def instance(plate):
    with DagsterInstance.from_config(str(plate.dagster_home)) as inst:
        yield inst


@pytest.fixture
def graphql(plate, instance):
    """``graphql(query, variables)`` against the code location of workspace.yaml (no webserver)."""
    from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql

    with define_out_of_process_workspace(str(REPO / "workspace.yaml"), None, instance) as process:
        def run(query: str, variables: dict | None = None) -> dict:
            result = execute_dagster_graphql(process.create_request_context(), query, variables or {})
            assert not result.errors, result.errors
            return result.data

        yield run


STALE_BY_PARTITION = """query($key: AssetKeyInput!, $p: [String!]!) { assetNodeOrError(assetKey: $key) {
  ... on AssetNode { staleStatusByPartition(partitions: $p) } } }"""
STALE = """query($key: AssetKeyInput!, $p: String) { assetNodeOrError(assetKey: $key) {
  ... on AssetNode { staleStatus(partition: $p)
    staleCauses(partition: $p) { reason key { path } partitionKey } } } }"""


def gql_status(graphql, samples: list[str]) -> dict[str, list[str] | str]:
    """``{asset: [status per sample]}`` for the chain, ``{asset: status}`` for the summaries (GraphQL)."""
    out: dict = {}
    for name in CHAIN:
        node = graphql(STALE_BY_PARTITION, {"key": {"path": [name]}, "p": samples})["assetNodeOrError"]
        out[name] = node["staleStatusByPartition"]
    for name in SUMMARIES:
        out[name] = graphql(STALE, {"key": {"path": [name]}, "p": None})["assetNodeOrError"]["staleStatus"]
    return out


def api_status(instance, samples: list[str]) -> dict[str, list[str] | str]:
    """The same through the Python API (Dagster's resolver over the code location's asset graph)."""
    from phenocoder_assets.definitions import defs
    from phenocoder_assets.refresh import stale_resolver

    resolver = stale_resolver(instance, defs.resolve_asset_graph())
    out: dict = {name: [resolver.get_status(AssetKey(name), s).value for s in samples] for name in CHAIN}
    out.update({name: resolver.get_status(AssetKey(name)).value for name in SUMMARIES})
    return out


def all_fresh(samples: list[str]) -> dict:
    return {**{name: ["FRESH"] * len(samples) for name in CHAIN}, **{name: "FRESH" for name in SUMMARIES}}


def resources(plate) -> dict:
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    return {"storage": PhenocoderStorage(root=str(plate.home)), "mlflow": MLflowTracking(root=str(plate.home))}


def materialize_one(plate, instance, selection: list[str], partition: str | None = None,
                    run_config: dict | None = None):
    from phenocoder_assets.definitions import ASSETS

    res = materialize(ASSETS, selection=selection, partition_key=partition, instance=instance,
                      resources=resources(plate), run_config=run_config or {})
    assert res.success
    return res


def latest_version(instance, name: str, partition: str | None = None) -> str:
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(name), asset_partitions=[partition] if partition else None),
        limit=1, ascending=False).records
    return records[0].event_log_entry.asset_materialization.tags["dagster/data_version"]


@pytest.mark.slow
def test_after_the_demo_everything_is_fresh_with_digest_versions(plate, instance, graphql):
    samples = plate.samples
    assert plate.dagster_home == plate.home / "instance"  # the demo used DAGSTER_HOME, not <home>/dagster
    assert not (plate.home / "dagster").exists()
    assert api_status(instance, samples) == all_fresh(samples)
    assert gql_status(graphql, samples) == all_fresh(samples)
    for name in CHAIN:
        for sample in samples:
            version = latest_version(instance, name, sample)
            assert re.fullmatch(r"[0-9a-f]{24}", version), (name, sample, version)
            recorded = json.loads((plate.home / name / sample / "data_version.json").read_text())
            assert recorded["data_version"] == version
    # partitions of one asset computed from different wells have different versions
    assert len({latest_version(instance, "latents", s) for s in samples}) == len(samples)
    for name in SUMMARIES:
        assert re.fullmatch(r"[0-9a-f]{24}", latest_version(instance, name)), name
    reference = json.loads((plate.home / "cluster_reference" / "_" / "reference_info.json").read_text())
    assert latest_version(instance, "cluster_reference").startswith(reference["id"])  # id = content digest


@pytest.mark.slow
def test_an_identical_rerun_leaves_everything_fresh(plate, instance, graphql):
    sample = plate.samples[0]
    before = latest_version(instance, "latents", sample)
    res = materialize_one(plate, instance, ["latents"], sample)
    assert latest_version(instance, "latents", sample) == before
    assert res.run_id in {r.run_id for r in instance.fetch_materializations(AssetKey("latents"), limit=5).records}
    assert gql_status(graphql, plate.samples) == all_fresh(plate.samples)
    assert api_status(instance, plate.samples) == all_fresh(plate.samples)


@pytest.mark.slow
def test_other_latents_make_exactly_their_downstream_stale(plate, instance, graphql):
    samples = plate.samples
    sample = samples[1]
    before = latest_version(instance, "latents", sample)
    materialize_one(plate, instance, ["latents"], sample, RADIUS)
    assert latest_version(instance, "latents", sample) != before
    stale_well = ["FRESH", "STALE", "FRESH"]
    expected = {**all_fresh(samples), "clusters": stale_well, "graph_stats": stale_well,
                "cluster_reference": "STALE", "embedding": "STALE"}
    assert gql_status(graphql, samples) == expected
    assert api_status(instance, samples) == expected
    # the root cause names the replaced partition
    for name, partition in (("graph_stats", sample), ("embedding", None)):
        causes = graphql(STALE, {"key": {"path": [name]}, "p": partition})["assetNodeOrError"]["staleCauses"]
        assert {(c["key"]["path"][0], c["partitionKey"], c["reason"]) for c in causes} == \
            {("latents", sample, "has a new data version")}, name


@pytest.mark.slow
def test_back_to_the_old_settings_is_fresh_again(plate, instance, graphql):
    materialize_one(plate, instance, ["latents"], plate.samples[1], RADIUS)
    assert api_status(instance, plate.samples)["embedding"] == "STALE"
    materialize_one(plate, instance, ["latents"], plate.samples[1])  # the default settings, as the demo used
    assert gql_status(graphql, plate.samples) == all_fresh(plate.samples)
    assert api_status(instance, plate.samples) == all_fresh(plate.samples)


def _evaluate_refresh(plate, instance):
    from phenocoder_assets.definitions import build_definitions
    from phenocoder_assets.refresh import refresh_stale_sensor
    from phenocoder_assets.resources import PhenocoderStorage

    defs = build_definitions(storage=PhenocoderStorage(root=str(plate.home)))
    ctx = build_sensor_context(instance=instance, definitions=defs, resources=resources(plate))
    return refresh_stale_sensor(ctx)


@pytest.mark.slow
def test_refresh_stale_sensor_brings_everything_up_to_date(plate, instance, graphql):
    from phenocoder_assets.refresh import embedding_inputs_changed

    samples = plate.samples
    sample = samples[2]
    materialize_one(plate, instance, ["latents"], sample, RADIUS)
    first = _evaluate_refresh(plate, instance)
    # per well first: the stale stages of that well only; the embedding waits for them
    assert [(r.partition_key, [k.path[0] for k in r.asset_selection], r.job_name) for r in first.run_requests] == \
        [(sample, ["clusters", "graph_stats"], "sample_pipeline")]
    again = _evaluate_refresh(plate, instance)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]  # one key per state
    request = first.run_requests[0]
    materialize_one(plate, instance, ["clusters", "graph_stats"], sample, request.run_config)
    # the folder-recorded check that also holds beyond Dagster's 100-partition limit sees the new graph_stats
    storage = resources(plate)["storage"]
    assert embedding_inputs_changed(storage)

    second = _evaluate_refresh(plate, instance)
    assert [([k.path[0] for k in r.asset_selection], r.job_name, r.partition_key) for r in second.run_requests] == \
        [(["embedding"], "refresh_summaries", None)]
    materialize_one(plate, instance, ["embedding"])

    assert not embedding_inputs_changed(storage)
    third = _evaluate_refresh(plate, instance)
    assert isinstance(third, SkipReason) and "nothing stale" in third.skip_message
    # the reference fans in over every well's latents: STALE, and left for a deliberate rebuild
    expected = {**all_fresh(samples), "cluster_reference": "STALE"}
    assert gql_status(graphql, samples) == expected
    assert api_status(instance, samples) == expected
