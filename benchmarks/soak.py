"""Soak test: a synthetic plate of many small wells through the sensor and the per-well assets.

    python benchmarks/soak.py [--wells 96] [--concurrency 2] [--home DIR] [--keep]

Writes a 2-D synthetic plate (64 px wells, ~10 nuclei each) into the landing folder next to a few bad
inputs (an invalid plate name, a symlinked plate, a plate whose labels folder is a symlink, a plate without
its EXPORT_COMPLETE marker), evaluates the landing-folder sensor once, and executes every run it requests
(``sample_pipeline``: ``sdata`` -> ``patches`` per well) with the multiprocess executor, ``--concurrency``
runs at a time (one long-lived run worker per slot, so a leak would accumulate). Then it checks, from the
Dagster instance, that every partition was materialized exactly once per asset and that no run failed,
evaluates the sensor again (it must request nothing) and prints one JSON document: wells, partitions
requested, materializations, failed runs, bad inputs refused, wall time, run times, and memory: the
orchestrating process's RSS at start and end, each worker's RSS after its first and last runs, and the
largest RSS of any step process (sampled every 0.5 s). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PLATE = "SOAK"
RUN_CONFIG_PATCH_SIZE = [16, 16]


def sample_job():
    """The project's per-sample job with the multiprocess executor (reconstructed in every step process)."""
    from phenocoder_assets.definitions import build_definitions
    from phenocoder_assets.executors import select_executor

    return build_definitions(executor=select_executor("multiprocess")).resolve_job_def("sample_pipeline")


def _rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


class TreeSampler(threading.Thread):
    """Largest RSS of any process below the given worker pids (the step processes), sampled every 0.5 s."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.workers: set[int] = set()
        self.max_step_mb = 0.0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            tree = _children()
            stack = [c for w in self.workers for c in tree.get(w, [])]
            while stack:
                pid = stack.pop()
                rss = _rss_mb(pid)
                if rss == rss:  # not NaN: the process was still there
                    self.max_step_mb = max(self.max_step_mb, rss)
                stack.extend(tree.get(pid, []))
            self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# --------------------------------------------------------------------------------------------------
# Worker: executes its share of the run requests, one after the other, in this process
# --------------------------------------------------------------------------------------------------


def worker(spec_path: str) -> int:
    from dagster import AssetKey, DagsterInstance, execute_job, reconstructable

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    with DagsterInstance.from_config(spec["dagster_home"]) as instance:
        for req in spec["requests"]:
            t0 = time.perf_counter()
            run_config = {"resources": {"storage": {"config": {"root": spec["home"]}}},
                          "ops": {"patches": {"config": {"patch_size": RUN_CONFIG_PATCH_SIZE}}}}
            try:
                with execute_job(reconstructable(sample_job), instance=instance, run_config=run_config,
                                 tags={**req["tags"], "dagster/partition": req["partition_key"]},
                                 asset_selection=[AssetKey(a) for a in req["assets"]]) as result:
                    ok, run_id = result.success, result.run_id
            except Exception as err:  # noqa: BLE001 - recorded as a failed run
                ok, run_id = False, f"error: {err}"
            row = {"partition": req["partition_key"], "ok": ok, "run_id": run_id,
                   "seconds": round(time.perf_counter() - t0, 2), "worker_rss_mb": round(_rss_mb(), 1)}
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# Orchestrator
# --------------------------------------------------------------------------------------------------


def _bad_inputs(landing: Path, outside: Path) -> list[str]:
    from phenocoder_lib.synthetic import make_synthetic_plate

    small = dict(n_wells=1, ndim=2, n_channels=2, image_size=64, nuclei_per_well=5, seed=9)
    make_synthetic_plate(outside / "EXTERNAL", **small)
    make_synthetic_plate(landing / "bad..name", **small)
    (landing / "LINKED").symlink_to(outside / "EXTERNAL", target_is_directory=True)
    make_synthetic_plate(landing / "SUBLINK", **small)
    shutil.rmtree(landing / "SUBLINK" / "labels")
    (landing / "SUBLINK" / "labels").symlink_to(outside / "EXTERNAL" / "labels", target_is_directory=True)
    make_synthetic_plate(landing / "UNFINISHED", **small)
    (landing / "UNFINISHED" / "EXPORT_COMPLETE").unlink()
    return ["bad..name", "LINKED", "SUBLINK", "UNFINISHED"]


def soak(home: Path, n_wells: int, concurrency: int) -> dict:
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter, build_sensor_context

    from phenocoder_assets.resources import PhenocoderStorage
    from phenocoder_assets.sensors import incoming_plates_sensor
    from phenocoder_lib.synthetic import make_synthetic_plate

    rss_start = _rss_mb()
    t_start = time.perf_counter()
    landing = home / "incoming"
    bad = _bad_inputs(landing, home.parent / f"{home.name}-outside")
    make_synthetic_plate(landing / PLATE, n_wells=n_wells, ndim=2, n_channels=2, image_size=64,
                         nuclei_per_well=10, seed=0)
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    storage = PhenocoderStorage(root=str(home))
    report: dict = {"wells": n_wells, "concurrency": concurrency, "executor": "multiprocess",
                    "bad_inputs_tried": len(bad)}
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        tick = incoming_plates_sensor(build_sensor_context(instance=instance, resources={"storage": storage}))
        for req in tick.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        requests = [{"partition_key": r.partition_key, "tags": dict(r.tags),
                     "assets": [k.to_user_string() for k in r.asset_selection]} for r in tick.run_requests]
        cursor = tick.cursor
        partitions = sorted(instance.get_dynamic_partitions("samples"))
    report["partitions_registered"] = len(partitions)
    report["runs_requested"] = len(requests)
    report["bad_inputs_registered"] = sum(1 for p in partitions if not p.startswith(f"{PLATE}_"))

    # run workers: each takes every concurrency-th request
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    sampler = TreeSampler()
    procs = []
    t_runs = time.perf_counter()
    for i in range(concurrency):
        spec = {"home": str(home), "dagster_home": str(dagster_home), "requests": requests[i::concurrency],
                "out": str(work / f"worker{i}.jsonl")}
        (work / f"worker{i}.json").write_text(json.dumps(spec))
        log = open(work / f"worker{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(work / f"worker{i}.json")],
                                      stdout=log, stderr=subprocess.STDOUT))
        log.close()
    sampler.workers = {p.pid for p in procs}
    sampler.start()
    codes = [p.wait() for p in procs]
    sampler.stop()
    report["runs_seconds"] = round(time.perf_counter() - t_runs, 1)
    rows = [json.loads(line) for i in range(concurrency) if (work / f"worker{i}.jsonl").exists()
            for line in (work / f"worker{i}.jsonl").read_text().splitlines()]

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        counts: dict[str, dict[str, int]] = {}
        for asset in ("sdata", "patches"):
            per: dict[str, int] = {}
            for record in instance.fetch_materializations(AssetKey(asset), limit=10_000).records:
                per[record.partition_key] = per.get(record.partition_key, 0) + 1
            counts[asset] = per
        failed = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
        succeeded = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        again = incoming_plates_sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                            resources={"storage": storage}))
    expected = {f"{PLATE}_{w}" for w in _wells(n_wells)}
    once = all(set(per) == expected and set(per.values()) == {1} for per in counts.values())
    report.update({
        "runs_executed": len(rows),
        "runs_succeeded": succeeded,
        "runs_failed": max(failed, sum(1 for r in rows if not r["ok"])),
        "worker_exit_codes": codes,
        "materializations": {asset: sum(per.values()) for asset, per in counts.items()},
        "every_partition_materialized_exactly_once": once,
        "second_sensor_tick_run_requests": len(again.run_requests or []),
        "staging_leftovers": sum(1 for p in home.glob("*/.*") if p.name.startswith((".stage-", ".tmp"))),
    })
    by_worker: dict[int, list[float]] = {}
    for i in range(concurrency):
        path = work / f"worker{i}.jsonl"
        if path.exists():
            by_worker[i] = [json.loads(line)["worker_rss_mb"] for line in path.read_text().splitlines()]
    secs = sorted(r["seconds"] for r in rows) or [float("nan")]
    report["run_seconds"] = {"median": secs[len(secs) // 2], "max": secs[-1]}
    report["memory_mb"] = {
        "orchestrator_start": round(rss_start, 1),
        "orchestrator_end": round(_rss_mb(), 1),
        "worker_after_first_run": [v[0] for v in by_worker.values() if v],
        "worker_after_last_run": [v[-1] for v in by_worker.values() if v],
        "worker_max": [max(v) for v in by_worker.values() if v],
        "worker_growth_after_warmup": [round(v[-1] - v[min(2, len(v) - 1)], 1) for v in by_worker.values() if v],
        "step_process_max": round(sampler.max_step_mb, 1),
        "samples": sampler.samples,
    }
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _wells(n: int) -> list[str]:
    from phenocoder_lib.synthetic import _well_names

    return _well_names(n)


def check(report: dict) -> list[str]:
    """The soak's pass conditions; returns what failed."""
    problems = []
    n = report["wells"]
    if report["partitions_registered"] != n or report["runs_requested"] != n or report["runs_executed"] != n:
        problems.append(f"expected {n} partitions/requests/runs")
    if report["bad_inputs_registered"]:
        problems.append("a bad input was registered as a partition")
    if not report["every_partition_materialized_exactly_once"]:
        problems.append("not every partition materialized exactly once")
    if report["runs_failed"] or report["runs_succeeded"] != n or any(report["worker_exit_codes"]):
        problems.append("a run failed")
    if report["second_sensor_tick_run_requests"]:
        problems.append("the sensor requested runs again")
    if report["staging_leftovers"]:
        problems.append("staging folders left behind")
    mem = report["memory_mb"]
    if any(g > 150 for g in mem["worker_growth_after_warmup"]):  # a leak of ~1.5 MB per run would show
        problems.append(f"worker memory grew: {mem['worker_growth_after_warmup']} MB")
    if mem["orchestrator_end"] - mem["orchestrator_start"] > 150:
        problems.append("orchestrator memory grew")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wells", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--home", default=None, help="storage root (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not 1 <= args.wells <= 384 or args.concurrency < 1:
        parser.error("--wells must be 1..384 and --concurrency >= 1")
    base = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="phenocoder-soak-")) / "home"
    os.environ.setdefault("PHENOCODER_HOME", str(base))
    try:
        report = soak(base, args.wells, args.concurrency)
        report["problems"] = check(report)
        print(json.dumps(report, indent=2))
        return 1 if report["problems"] else 0
    finally:
        if not args.home and not args.keep:
            shutil.rmtree(base.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
