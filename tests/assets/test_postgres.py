"""The production instance on a real PostgreSQL server (``PHENOCODER_TEST_POSTGRES_URL``, started by .ci/run).

deploy/postgres/dagster.yaml as shipped: runs, the event log (materializations with their data
versions, dynamic partitions, NOTIFY on every event), schedules and sensor ticks are stored in
PostgreSQL through psycopg2; MLflow's tracking store lives on the same server.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from _instances import POSTGRES_ENV, fresh_database, postgres_url
from dagster import AssetKey, DagsterInstance, DataVersion, MaterializeResult, asset, materialize

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg_instance(tmp_path, monkeypatch):
    """An instance from deploy/postgres/dagster.yaml on a fresh database."""
    postgres_url()  # skip locally / fail in CI without a server
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "postgres" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("PHENOCODER_DAGSTER_PG_URL", fresh_database())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with DagsterInstance.get() as instance:
        yield instance


def test_a_missing_server_fails_in_ci_and_skips_locally(monkeypatch):
    from _pytest.outcomes import Failed, Skipped

    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=POSTGRES_ENV):
        postgres_url()
    monkeypatch.delenv("CI")
    with pytest.raises(Skipped, match=POSTGRES_ENV):
        postgres_url()


def test_sqlalchemy_and_driver_avoid_the_psycopg3_notify_trap():
    import sqlalchemy
    from packaging.version import Version

    assert Version(sqlalchemy.__version__) < Version("2.1"), sqlalchemy.__version__
    url = sqlalchemy.engine.make_url("postgresql://u@h/db")
    assert url.get_dialect().driver == "psycopg2"


def test_shipped_config_stores_runs_events_and_schedules_in_postgres(pg_instance):
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(pg_instance.schedule_storage, PostgresScheduleStorage)
    assert pg_instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"


def test_materializations_data_versions_partitions_and_ticks_round_trip(pg_instance):
    from dagster import DynamicPartitionsDefinition
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.remote_origin import (
        RegisteredCodeLocationOrigin,
        RemoteInstigatorOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        InstigatorStatus,
        SensorInstigatorData,
        TickData,
        TickStatus,
    )

    wells = DynamicPartitionsDefinition(name="samples")

    @asset(partitions_def=wells, code_version="1")
    def counted(context) -> MaterializeResult:
        return MaterializeResult(data_version=DataVersion(f"v-{context.partition_key}"))

    pg_instance.add_dynamic_partitions("samples", ["P_A01", "P_A02"])
    for key in ("P_A01", "P_A02"):
        assert materialize([counted], partition_key=key, instance=pg_instance).success  # NOTIFY per event
    assert sorted(pg_instance.get_dynamic_partitions("samples")) == ["P_A01", "P_A02"]
    assert pg_instance.get_materialized_partitions(AssetKey("counted")) == {"P_A01", "P_A02"}
    record = pg_instance.get_latest_data_version_record(AssetKey("counted"), False, "P_A02")
    assert record.event_log_entry.asset_materialization.tags["dagster/data_version"] == "v-P_A02"
    assert len(pg_instance.get_run_records()) == 2

    # instigator state, cursor and ticks (what the daemon writes for the sensors and the nightly schedule)
    origin = RemoteInstigatorOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("phenocoder"), "__repository__"), "incoming_plates_sensor")
    state = InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.RUNNING,
                            SensorInstigatorData(cursor='{"plates": {}}'))
    pg_instance.add_instigator_state(state)
    tick = pg_instance.create_tick(TickData(instigator_origin_id=origin.get_id(),
                                            instigator_name="incoming_plates_sensor",
                                            instigator_type=InstigatorType.SENSOR, status=TickStatus.STARTED,
                                            timestamp=1.0, selector_id=state.selector_id))
    pg_instance.update_tick(tick.with_status(TickStatus.SUCCESS))
    stored = pg_instance.get_instigator_state(origin.get_id(), state.selector_id)
    assert stored.status == InstigatorStatus.RUNNING and stored.instigator_data.cursor == '{"plates": {}}'
    ticks = pg_instance.get_ticks(origin.get_id(), state.selector_id)
    assert [t.status for t in ticks] == [TickStatus.SUCCESS]


def test_mlflow_tracking_store_on_the_same_server(tmp_path, monkeypatch):
    postgres_url()
    from phenocoder_assets.resources import MLflowTracking

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    uri = fresh_database("phenocoder_mlflow")
    tracking = MLflowTracking(tracking_uri=uri, root=str(tmp_path / "root"))
    assert tracking.resolved_artifact_location() == (tmp_path / "root" / "mlartifacts").as_uri()
    with tracking.start_run(run_name="pg", tags={"dagster.run_id": "x"}) as run:
        import mlflow

        mlflow.log_param("n_latent_dim", 16)
        mlflow.log_metric("loss", 0.5, step=1)
        (tmp_path / "note.txt").write_text("artifact")
        mlflow.log_artifact(str(tmp_path / "note.txt"))
    stored = tracking.client().get_run(run.info.run_id)
    assert stored.data.params["n_latent_dim"] == "16" and stored.data.metrics["loss"] == 0.5
    assert (tmp_path / "root" / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert "@" not in tracking.display_tracking_uri() or "***@" in tracking.display_tracking_uri()


def test_demo_keeps_a_users_dagster_yaml_and_honours_dagster_home(tmp_path, monkeypatch):
    """Without running the pipeline: the instance folder the demo picks and the file it leaves alone."""
    import phenocoder_assets.definitions  # noqa: F401 (loaded before the sensor is replaced below)
    from phenocoder_assets import cli

    postgres_url()
    home = tmp_path / "home"
    chosen = tmp_path / "elsewhere"
    chosen.mkdir()
    config = (REPO / "deploy" / "postgres" / "dagster.yaml").read_text()
    (chosen / "dagster.yaml").write_text(config)
    monkeypatch.setenv("PHENOCODER_DAGSTER_PG_URL", fresh_database())
    monkeypatch.setenv("DAGSTER_HOME", str(chosen))
    monkeypatch.setenv("PHENOCODER_HOME", str(home))

    class Stop(Exception):
        pass

    def stop(*_a, **_k):  # the plate is written: stop before the pipeline (covered by test_lineage)
        raise Stop

    monkeypatch.setattr("phenocoder_assets.sensors.incoming_plates_sensor", stop)
    with pytest.raises(Stop):
        cli.run_demo(home, wells=2, epochs=1, image_size=64, nuclei_per_well=10, quiet=True)
    assert (chosen / "dagster.yaml").read_text() == config
    assert not (home / "dagster").exists()  # the demo's own default instance folder was not used
    assert os.environ["DAGSTER_HOME"] == str(chosen)  # and the variable is left as the user set it
