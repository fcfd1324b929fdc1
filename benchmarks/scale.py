"""Screen scale: the Dagster instance with 10^4 - 10^5 ``samples`` partitions, measured.

For each ``--wells`` N the script builds a fresh instance (PostgreSQL with ``--postgres-url``, else
the embedded SQLite), registers N well partitions spread over ``--plates`` plate folders of 10 to
384 wells, reports ``sdata``, ``patches`` and ``latents`` materialized for every well without
running the pipeline (batched event writes, as ``report_runless_asset_event`` would record them),
and then measures, through the same code paths as ``dagster dev``:

* ``sensor_tick_all_present_s``: the landing-folder sensor with every plate already seen;
* ``new_plate``: the sensor daemon's tick (code server evaluation + run creation + queueing to the
  ``QueuedRunCoordinator``) for one new plate of ``--new-plate-wells`` wells, one run per plate
  (the default) and one run per well (before);
* ``graphql``: the queries of the asset page / partitions view of ``latents`` (partition stats,
  the UI's partition health query, ``staleStatus`` of one partition): seconds and response bytes;
* ``backfill``: a UI backfill of ``--backfill-wells`` partitions (``launchPartitionBackfill``) and
  the backfill daemon's first iteration, which creates its runs (384 wells per run);
* ``dequeue``: the run queue daemon's dequeue rate (runs/s), with a launcher that does not execute;
* ``db_bytes_per_well``: instance database size / N.

Prints one JSON document (and writes it to ``--out``). Timings are medians of ``--repeat`` calls.

    python benchmarks/scale.py --wells 10000 30000 --postgres-url postgresql://postgres@127.0.0.1:55433/postgres
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ASSETS = ("sdata", "patches", "latents")
LOCATION = "phenocoder_scale"
SUBSET_ENV = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"


def _log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def plate_sizes(n_wells: int, n_plates: int, seed: int) -> list[int]:
    """``n_plates`` plate sizes in [10, 384] summing to ``n_wells`` (seeded)."""
    import numpy as np

    n_plates = min(n_plates, n_wells // 10)
    if n_plates < 1 or n_wells > 384 * n_plates:
        raise ValueError(f"--wells {n_wells} cannot be split into --plates {n_plates} plates of 10 to 384 wells.")
    rng = np.random.default_rng(seed)
    sizes = np.full(n_plates, 10)
    extra = n_wells - sizes.sum()
    while extra > 0:  # spread the rest at random, never above 384 per plate
        room = 384 - sizes
        weights = rng.random(n_plates) * (room > 0)
        add = np.minimum(room, np.floor(weights / weights.sum() * extra).astype(int))
        if add.sum() == 0:
            add[np.argmax(room)] = 1
        sizes += add
        extra = n_wells - sizes.sum()
    return sizes.tolist()


def well_names(n: int) -> list[str]:
    rows = [chr(65 + i) for i in range(16)] + [f"A{chr(65 + i)}" for i in range(26)]
    return [f"{r}{c:02d}" for r in rows for c in range(1, 25)][:n]


def _instance_yaml(home: Path, pg_url: str | None) -> None:
    lines = []
    if pg_url:
        lines += ["storage:", "  postgres:", f"    postgres_url: {pg_url}"]
    lines += ["run_coordinator:", "  module: dagster.core.run_coordinator", "  class: QueuedRunCoordinator",
              "  config:", "    max_concurrent_runs: -1",
              # runs are queued and dequeued but not executed: the launcher only records them
              "run_launcher:", "  module: dagster._core.test_utils", "  class: MockedRunLauncher",
              "telemetry:", "  enabled: false"]
    (home / "dagster.yaml").write_text("\n".join(lines) + "\n")


def _fresh_database(pg_url: str, name: str) -> str:
    import psycopg2

    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return pg_url.rsplit("/", 1)[0] + "/" + name


def _db_bytes(instance, pg_url: str | None, home: Path) -> int:
    if pg_url:
        import psycopg2

        conn = psycopg2.connect(pg_url)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(current_database())")
            size = int(cur.fetchone()[0])
        conn.close()
        return size
    return sum(p.stat().st_size for p in home.rglob("*.db") if p.is_file())


def report_materializations(instance, keys: list[str], assets=ASSETS, chunk: int = 5000) -> float:
    """Record a materialization of each of ``assets`` for each key; returns seconds."""
    from dagster import AssetKey, AssetMaterialization
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.events.log import EventLogEntry
    from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID

    t0 = time.perf_counter()
    for asset in assets:
        for start in range(0, len(keys), chunk):
            now = time.time()
            events = [EventLogEntry(
                user_message="", level=logging.INFO, job_name=RUNLESS_JOB_NAME, run_id=RUNLESS_RUN_ID,
                error_info=None, timestamp=now,
                dagster_event=DagsterEvent(
                    event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value, job_name=RUNLESS_JOB_NAME,
                    event_specific_data=StepMaterializationData(AssetMaterialization(
                        asset_key=AssetKey(asset), partition=key, metadata={"n_objects": 100})),
                )) for key in keys[start:start + chunk]]
            instance.event_log_storage.store_event_batch(events)
    return time.perf_counter() - t0


def _median_time(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


PARTITION_STATS = """query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  partitionStats { numMaterialized numPartitions numFailed numMaterializing } } } }"""
# the partitions view of an asset (the UI's PartitionHealthQuery, reduced to its default-partitions part)
PARTITION_HEALTH = """query ($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  id partitionKeysByDimension { name type partitionKeys }
  assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
    materializedPartitions materializingPartitions failedPartitions } } } } }"""
STALE_STATUS = """query ($key: AssetKeyInput!, $partition: String!) { assetNodes(assetKeys: [$key]) {
  staleStatus(partition: $partition) staleCauses(partition: $partition) { reason category } } }"""
LAST_MATERIALIZATION = """query ($key: AssetKeyInput!, $partition: String!) { assetNodeOrError(assetKey: $key) {
  ... on AssetNode { assetMaterializations(partitions: [$partition], limit: 1) { runId partition timestamp } } } }"""
LAUNCH_BACKFILL = """mutation ($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
  __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""


def graphql_figures(wctx, key: str, repeat: int) -> dict:
    from dagster_graphql.test.utils import execute_dagster_graphql

    out = {}
    for name, query, variables in (
        ("partition_stats", PARTITION_STATS, {"key": {"path": ["latents"]}}),
        ("partition_health", PARTITION_HEALTH, {"key": {"path": ["latents"]}}),
        ("stale_status_one_partition", STALE_STATUS, {"key": {"path": ["latents"]}, "partition": key}),
        ("last_materialization_one_partition", LAST_MATERIALIZATION, {"key": {"path": ["latents"]},
                                                                      "partition": key}),
    ):
        def _q(query=query, variables=variables, name=name):
            res = execute_dagster_graphql(wctx.create_request_context(), query, variables)
            if res.errors:
                raise RuntimeError(f"GraphQL {name}: {res.errors}")
            return res.data

        seconds, data = _median_time(_q, repeat)
        out[name] = {"s": round(seconds, 3), "bytes": len(json.dumps(data))}
    return out


def _set_sensor_cursor(instance, remote_sensor, cursor: str) -> None:
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        InstigatorStatus,
        InstigatorType,
        SensorInstigatorData,
    )

    state = InstigatorState(remote_sensor.get_remote_origin(), InstigatorType.SENSOR, InstigatorStatus.RUNNING,
                            SensorInstigatorData(cursor=cursor, min_interval=remote_sensor.min_interval_seconds,
                                                 sensor_type=remote_sensor.sensor_type))
    if instance.get_instigator_state(remote_sensor.get_remote_origin_id(), remote_sensor.selector_id):
        instance.update_instigator_state(state)
    else:
        instance.add_instigator_state(state)


def _sensor_cursor(instance, remote_sensor) -> str:
    state = instance.get_instigator_state(remote_sensor.get_remote_origin_id(), remote_sensor.selector_id)
    return state.instigator_data.cursor


def daemon_tick(wctx, remote_sensor, cursor: str) -> tuple[float, int, str]:
    """One sensor daemon iteration from ``cursor``: seconds, runs created, the new cursor."""
    from dagster._daemon.sensor import execute_sensor_iteration

    instance = wctx.instance
    _set_sensor_cursor(instance, remote_sensor, cursor)
    before = instance.get_runs_count()
    t0 = time.perf_counter()
    list(execute_sensor_iteration(wctx, logging.getLogger("scale"), None, None))
    seconds = time.perf_counter() - t0
    ticks = instance.get_ticks(remote_sensor.get_remote_origin_id(), remote_sensor.selector_id, limit=1)
    if ticks and ticks[0].error:
        raise RuntimeError(f"sensor tick failed: {ticks[0].error.to_string()[:2000]}")
    return seconds, instance.get_runs_count() - before, _sensor_cursor(instance, remote_sensor)


def dequeue_rate(wctx, limit_s: float = 120.0) -> dict:
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    instance = wctx.instance
    queued = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
    with QueuedRunCoordinatorDaemon(interval_seconds=1) as daemon:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit_s:
            list(daemon.run_iteration(wctx))
            if instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED])) == 0:
                break
        seconds = time.perf_counter() - t0
    left = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.QUEUED]))
    return {"runs": queued - left, "s": round(seconds, 2),
            "runs_per_s": round((queued - left) / seconds, 1) if seconds else None, "left_queued": left}


def _workspace(instance):
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import ModuleTarget

    return WorkspaceProcessContext(
        instance,
        ModuleTarget(module_name="phenocoder_assets.definitions", attribute="defs", working_directory=str(REPO),
                     location_name=LOCATION))


def _remote_sensor(wctx):
    ctx = wctx.create_request_context()
    location = ctx.get_code_location(LOCATION)
    repo = next(iter(location.get_repositories().values()))
    return repo.get_sensor("incoming_plates_sensor"), repo.name


def new_plate(landing: Path, workdir: Path, name: str, n_wells: int) -> Path:
    """A new complete plate of ``n_wells`` wells (hard links of 2 tiny template wells)."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("phenocoder_benchmark_suite", REPO / "benchmarks" / "run.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    src = suite.synthetic_plate(workdir, n_wells * 4, objects_per_well=4, template_wells=2)
    dest = landing / name
    shutil.copytree(src, dest, copy_function=os.link)
    return dest


def measure(n_wells: int, args, workdir: Path) -> dict:
    from dagster import DagsterInstance

    from phenocoder_assets.sensors import MARKER, quick_signature

    home = workdir / f"N{n_wells}"
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True)
    pg_url = _fresh_database(args.postgres_url, f"phenocoder_scale_{n_wells}") if args.postgres_url else None
    _instance_yaml(dagster_home, pg_url)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ["PHENOCODER_HOME"] = str(home / "data")
    landing = home / "data" / "incoming"
    landing.mkdir(parents=True)
    out: dict = {"wells": n_wells, "storage": "postgresql" if pg_url else "sqlite"}
    sizes = plate_sizes(n_wells, args.plates, args.seed)
    out["plates"] = len(sizes)
    out["wells_per_plate"] = {"min": min(sizes), "max": max(sizes), "mean": round(n_wells / len(sizes), 1)}

    instance = DagsterInstance.get()
    keys, plates_seen = [], {}
    for i, size in enumerate(sizes):
        plate = f"SCALE{i:04d}"
        (landing / plate).mkdir()
        (landing / plate / MARKER).write_text("")
        plates_seen[plate] = f"{quick_signature(landing / plate)}:none"
        keys += [f"{plate}_{w}" for w in well_names(size)]
    t0 = time.perf_counter()
    instance.add_dynamic_partitions("samples", keys)
    out["add_partitions_s"] = round(time.perf_counter() - t0, 2)
    seconds = report_materializations(instance, keys, args.report_assets)
    n_events = len(keys) * len(args.report_assets)
    out["report_materializations"] = {"assets": list(args.report_assets), "events": n_events,
                                      "s": round(seconds, 1), "events_per_s": round(n_events / seconds)}
    db = _db_bytes(instance, pg_url, dagster_home)
    out["db_bytes_per_well"] = round(db / n_wells)
    _log(f"N={n_wells}: {len(keys)} partitions, {out['report_materializations']} in the instance ({db / 1e6:.0f} MB)")

    cursor = json.dumps({"plates": plates_seen}, sort_keys=True)
    with _workspace(instance) as wctx:
        remote_sensor, _ = _remote_sensor(wctx)
        ticks = [daemon_tick(wctx, remote_sensor, cursor) for _ in range(args.repeat)]
        out["sensor_tick_all_present_s"] = round(statistics.median(t[0] for t in ticks), 2)
        assert all(t[1] == 0 for t in ticks), "no plate changed: the tick must request nothing"
        out["new_plate"] = {"wells": args.new_plate_wells}
        # a plate run writes one "planned" event per asset and well unless the run-creating process
        # (daemon, webserver) has DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS=true: both measured
        for name, flag in (("one_run_per_plate", None), ("one_run_per_plate_partition_subset_events", "true")):
            _set_subset_flag(flag)
            new_plate(landing, workdir, f"NEW{name.upper()}", args.new_plate_wells)
            seconds, runs, cursor = daemon_tick(wctx, remote_sensor, cursor)
            out["new_plate"][name] = {"tick_and_queue_s": round(seconds, 2), "runs_queued": runs}
        cursor_after = cursor
        out["graphql"] = graphql_figures(wctx, keys[len(keys) // 2], args.repeat)
        if args.backfill_wells > 0:
            _set_subset_flag("true" if args.subset_events else None)
            out["backfill"] = backfill(wctx, keys[:args.backfill_wells])
            out["backfill"]["partition_subset_events"] = bool(args.subset_events)
            _set_subset_flag(None)
    # before: one run per well (a second code server reads the variable), on a plate of
    # --before-wells wells (queueing costs the same per run whatever the plate; scaled to the plate below)
    os.environ["PHENOCODER_SENSOR_RUNS"] = "well"
    try:
        if args.before_wells <= 0:
            raise _Skip
        n_before = min(args.before_wells, args.new_plate_wells)
        new_plate(landing, workdir, "NEWPLATE2", n_before)
        with _workspace(instance) as wctx:
            remote_sensor, _ = _remote_sensor(wctx)
            seconds, runs, _ = daemon_tick(wctx, remote_sensor, cursor_after)
            out["new_plate"]["one_run_per_well"] = {
                "wells_measured": n_before, "tick_and_queue_s": round(seconds, 2), "runs_queued": runs,
                f"extrapolated_to_{args.new_plate_wells}_wells_s": round(seconds * args.new_plate_wells / n_before, 1)}
            out["dequeue"] = dequeue_rate(wctx)
    except _Skip:
        pass
    finally:
        os.environ.pop("PHENOCODER_SENSOR_RUNS", None)
    out["db_bytes_per_well_after_runs"] = round(_db_bytes(instance, pg_url, dagster_home) / n_wells)
    instance.dispose()
    return out


class _Skip(Exception):
    """--before-wells 0: no per-well queueing."""


def _set_subset_flag(value: str | None) -> None:
    if value is None:
        os.environ.pop(SUBSET_ENV, None)
    else:
        os.environ[SUBSET_ENV] = value


def backfill(wctx, keys: list[str]) -> dict:
    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster_graphql.test.utils import execute_dagster_graphql

    instance = wctx.instance
    params = {"partitionNames": keys, "assetSelection": [{"path": [a]} for a in ASSETS],
              "fromFailure": False}
    t0 = time.perf_counter()
    res = execute_dagster_graphql(wctx.create_request_context(), LAUNCH_BACKFILL, {"params": params})
    launch_s = time.perf_counter() - t0
    data = res.data["launchPartitionBackfill"]
    if data["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"launchPartitionBackfill: {data} {res.errors}")
    before = instance.get_runs_count()
    t0 = time.perf_counter()
    list(execute_backfill_iteration(wctx, logging.getLogger("scale")))
    iteration_s = time.perf_counter() - t0
    runs = instance.get_runs_count() - before
    return {"wells": len(keys), "launch_s": round(launch_s, 2), "first_daemon_iteration_s": round(iteration_s, 2),
            "runs_created": runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wells", type=int, nargs="+", default=[10_000])
    parser.add_argument("--plates", type=int, default=1000)
    parser.add_argument("--new-plate-wells", type=int, default=384)
    parser.add_argument("--backfill-wells", type=int, default=10_000)
    parser.add_argument("--no-subset-events", dest="subset_events", action="store_false",
                        help=f"queue the backfill without {SUBSET_ENV}=true (one planned event per well and asset)")
    parser.add_argument("--before-wells", type=int, default=96,
                        help="wells of the plate queued one run per well (the 'before' figure)")
    parser.add_argument("--postgres-url", default=os.environ.get("PHENOCODER_TEST_POSTGRES_URL"),
                        help="server URL (a database phenocoder_scale_<N> is created on it); default SQLite")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--report-assets", nargs="+", default=list(ASSETS), choices=ASSETS,
                        help="assets reported materialized for every well (fewer: a cheaper set-up at 10^5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="folder for the instances and plates (default: a temporary one)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = {"benchmark": "scale", "dagster": __import__("dagster").__version__, "runs": []}
    with tempfile.TemporaryDirectory(prefix="phenocoder-scale-", dir=args.workdir) as tmp:
        for n in args.wells:
            t0 = time.perf_counter()
            results["runs"].append(measure(n, args, Path(tmp)))
            results["runs"][-1]["benchmark_s"] = round(time.perf_counter() - t0, 1)
            _log(json.dumps(results["runs"][-1]))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return results


if __name__ == "__main__":
    main()
