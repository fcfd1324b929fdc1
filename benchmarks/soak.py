"""Soak test: a synthetic plate of many small wells through the sensor and every per-well asset it drives.

    python benchmarks/soak.py [--wells 96] [--concurrency 2] [--home DIR] [--keep]

Writes a 2-D synthetic plate (64 px wells, ~25 nuclei each) into the landing folder next to a few bad
inputs (an invalid plate name, a symlinked plate, a plate whose labels folder is a symlink, a plate without
its EXPORT_COMPLETE marker), then goes through the three phases of a plate's life, each one a sensor tick
(with the previous tick's cursor) whose run requests (``sample_pipeline``) execute with the multiprocess
executor, ``--concurrency`` runs at a time (one long-lived run worker per slot, so a leak would accumulate):

1. ``ingest``: no model yet, the sensor requests ``sdata`` -> ``patches`` per well;
2. ``encode``: after a tiny ``model`` is trained once (one epoch on every well), it requests ``latents``;
3. ``spatial``: after ``cluster_reference`` is built once, it requests ``clusters`` -> ``graph_stats``.

``model`` and ``cluster_reference`` are materialized with Dagster's ``materialize`` (in-process
executor) in a short-lived helper process, so the orchestrator's memory figures stay those of the
sensor and the instance. A final tick must request nothing. Then it checks, from the Dagster instance,
that every partition was materialized exactly once per per-well asset and that no run failed, and prints
one JSON document: wells, partitions requested, runs per phase, materializations, failed runs, bad inputs
refused, wall time, run times, and memory: the orchestrating process's RSS at start and end, each
worker's RSS after its first and last runs, and the largest RSS of any step process (sampled every 0.5 s),
overall and per phase. Exit status 1 if a check fails.
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
NUCLEI_PER_WELL = 25
PER_WELL_ASSETS = ("sdata", "patches", "latents", "clusters", "graph_stats")
PHASES = (("ingest", None), ("encode", "model"), ("spatial", "cluster_reference"))
TRAINING_CONFIG = {
    # tiny: the model's input shape is the patches' (RUN_CONFIG_PATCH_SIZE, 2 channels)
    "model": {"n_epochs": 1, "conv_layers": [8, 16], "n_latent_dim": 4, "n_dense_dim": 16, "batch_size": 32,
              "early_stopping_patience": 5, "plot": False, "seed": 0},
    "cluster_reference": {"resolution": 0.5, "seed": 0},
}


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
            ops = dict(req.get("run_config", {}).get("ops", {}))
            if "patches" in req["assets"] and "patches" not in ops:
                ops["patches"] = {"config": {"patch_size": RUN_CONFIG_PATCH_SIZE}}
            run_config = {"resources": {"storage": {"config": {"root": spec["home"]}}}, "ops": ops}
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


def train(spec_path: str) -> int:
    """Materialize one unpartitioned asset (``model``, ``cluster_reference``) in-process, once."""
    from dagster import DagsterInstance, materialize

    from phenocoder_assets.definitions import ASSETS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

    spec = json.loads(Path(spec_path).read_text())
    resources = {"storage": PhenocoderStorage(root=spec["home"]), "mlflow": MLflowTracking(root=spec["home"])}
    with DagsterInstance.from_config(spec["dagster_home"]) as instance:
        res = materialize(ASSETS, selection=[spec["asset"]], instance=instance, resources=resources,
                          run_config={"ops": {spec["asset"]: {"config": spec["config"]}}},
                          tags={"phenocoder/trigger": "soak"}, raise_on_error=False)
    Path(spec["out"]).write_text(json.dumps({"ok": res.success, "run_id": res.run_id, "rss_mb": round(_rss_mb(), 1)}))
    return 0 if res.success else 1


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


def _tick(instance, storage, cursor: str | None):
    """One sensor evaluation: registers its partitions, returns (run requests as dicts, cursor)."""
    from dagster import build_sensor_context

    from phenocoder_assets.sensors import RUNS_ENV, incoming_plates_sensor

    # the soak measures one run per well (time and memory per run): the sensor's per-well mode
    previous = os.environ.get(RUNS_ENV)
    os.environ[RUNS_ENV] = "well"
    try:
        tick = incoming_plates_sensor(build_sensor_context(instance=instance, cursor=cursor,
                                                           resources={"storage": storage}))
    finally:
        if previous is None:
            os.environ.pop(RUNS_ENV, None)
        else:
            os.environ[RUNS_ENV] = previous
    for req in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    requests = [{"partition_key": r.partition_key, "tags": dict(r.tags), "run_config": dict(r.run_config or {}),
                 "assets": [k.to_user_string() for k in r.asset_selection]} for r in tick.run_requests or []]
    return requests, tick.cursor


def _helper(work: Path, name: str, flag: str, spec: dict) -> subprocess.Popen:
    (work / f"{name}.json").write_text(json.dumps(spec))
    with open(work / f"{name}.log", "wb") as log:
        return subprocess.Popen([sys.executable, __file__, flag, str(work / f"{name}.json")],
                                stdout=log, stderr=subprocess.STDOUT)


def _execute(work: Path, phase: str, requests: list[dict], home: Path, dagster_home: Path,
             concurrency: int) -> dict:
    """Run the requests with ``concurrency`` run workers (each takes every concurrency-th request)."""
    sampler = TreeSampler()
    t_runs = time.perf_counter()
    procs = [_helper(work, f"{phase}-worker{i}", "--worker",
                     {"home": str(home), "dagster_home": str(dagster_home), "requests": requests[i::concurrency],
                      "out": str(work / f"{phase}-worker{i}.jsonl")})
             for i in range(concurrency)]
    sampler.workers = {p.pid for p in procs}
    sampler.start()
    codes = [p.wait() for p in procs]
    sampler.stop()
    by_worker = {i: [json.loads(line) for line in (work / f"{phase}-worker{i}.jsonl").read_text().splitlines()]
                 for i in range(concurrency) if (work / f"{phase}-worker{i}.jsonl").exists()}
    rows = [r for v in by_worker.values() for r in v]
    rss = [[r["worker_rss_mb"] for r in v] for v in by_worker.values() if v]
    secs = sorted(r["seconds"] for r in rows) or [float("nan")]
    return {"runs_requested": len(requests), "assets": sorted({a for r in requests for a in r["assets"]}),
            "runs_executed": len(rows), "runs_not_ok": sum(1 for r in rows if not r["ok"]),
            "worker_exit_codes": codes, "runs_seconds": round(time.perf_counter() - t_runs, 1),
            "run_seconds": {"median": secs[len(secs) // 2], "max": secs[-1]},
            "memory_mb": {"worker_after_first_run": [v[0] for v in rss], "worker_after_last_run": [v[-1] for v in rss],
                          "worker_max": [max(v) for v in rss],
                          "worker_growth_after_warmup": [round(v[-1] - v[min(2, len(v) - 1)], 1) for v in rss],
                          "step_process_max": round(sampler.max_step_mb, 1), "samples": sampler.samples}}


def soak(home: Path, n_wells: int, concurrency: int) -> dict:
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

    from phenocoder_assets.resources import PhenocoderStorage
    from phenocoder_lib.synthetic import make_synthetic_plate

    rss_start = _rss_mb()
    t_start = time.perf_counter()
    landing = home / "incoming"
    bad = _bad_inputs(landing, home.parent / f"{home.name}-outside")
    plate_wells = make_synthetic_plate(landing / PLATE, n_wells=n_wells, ndim=2, n_channels=2, image_size=64,
                                       nuclei_per_well=NUCLEI_PER_WELL, seed=0).wells
    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    storage = PhenocoderStorage(root=str(home))
    report: dict = {"wells": n_wells, "concurrency": concurrency, "executor": "multiprocess",
                    "bad_inputs_tried": len(bad), "phases": {}}
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    cursor = None
    samples: list[str] = []
    for phase, trained in PHASES:
        info: dict = {}
        if trained:  # the unpartitioned asset that unlocks this phase's stages, materialized once
            t0 = time.perf_counter()
            config = {**TRAINING_CONFIG[trained], "samples": samples}
            proc = _helper(work, trained, "--train", {"home": str(home), "dagster_home": str(dagster_home),
                                                      "asset": trained, "config": config,
                                                      "out": str(work / f"{trained}.result.json")})
            proc.wait()
            out = work / f"{trained}.result.json"
            result = json.loads(out.read_text()) if out.exists() else {"ok": False, "rss_mb": None}
            info[trained] = {"ok": result["ok"], "seconds": round(time.perf_counter() - t0, 1),
                             "process_rss_mb": result["rss_mb"]}
            if not result["ok"]:
                log = (work / f"{trained}.log").read_text(errors="replace")[-3000:]
                info[trained]["log_tail"] = log
        with DagsterInstance.from_config(str(dagster_home)) as instance:
            requests, cursor = _tick(instance, storage, cursor)
            samples = sorted(p for p in instance.get_dynamic_partitions("samples") if p.startswith(f"{PLATE}_"))
            if phase == "ingest":
                partitions = sorted(instance.get_dynamic_partitions("samples"))
        info.update(_execute(work, phase, requests, home, dagster_home, concurrency))
        report["phases"][phase] = info
    report["partitions_registered"] = len(partitions)
    report["bad_inputs_registered"] = sum(1 for p in partitions if not p.startswith(f"{PLATE}_"))
    phases = report["phases"].values()
    report["runs_requested"] = sum(p["runs_requested"] for p in phases)

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        counts: dict[str, dict[str, int]] = {}
        for asset in PER_WELL_ASSETS:
            per: dict[str, int] = {}
            for record in instance.fetch_materializations(AssetKey(asset), limit=10_000).records:
                per[record.partition_key] = per.get(record.partition_key, 0) + 1
            counts[asset] = per
        failed = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
        succeeded = instance.get_runs_count(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        again, _ = _tick(instance, storage, cursor)
    expected = {f"{PLATE}_{w}" for w in plate_wells}
    once = all(set(per) == expected and set(per.values()) == {1} for per in counts.values())
    trainings = [p[a] for p, (_, a) in zip(phases, PHASES, strict=True) if a]
    report.update({
        "runs_executed": sum(p["runs_executed"] for p in phases),
        "runs_succeeded": succeeded,
        "training_runs_succeeded": sum(1 for t in trainings if t["ok"]),
        "runs_failed": max(failed, sum(p["runs_not_ok"] for p in phases) + sum(1 for t in trainings if not t["ok"])),
        "worker_exit_codes": [c for p in phases for c in p["worker_exit_codes"]],
        "materializations": {asset: sum(per.values()) for asset, per in counts.items()},
        "every_partition_materialized_exactly_once": once,
        "second_sensor_tick_run_requests": len(again),
        "staging_leftovers": sum(1 for p in home.glob("*/.*") if p.name.startswith((".stage-", ".tmp"))),
    })
    secs = sorted(s for p in phases for s in (p["run_seconds"]["median"], p["run_seconds"]["max"]))
    report["runs_seconds"] = round(sum(p["runs_seconds"] for p in phases), 1)
    report["run_seconds"] = {"median_by_phase": {k: p["run_seconds"]["median"] for k, p in report["phases"].items()},
                             "max": secs[-1]}
    mems = [p["memory_mb"] for p in phases]
    report["memory_mb"] = {
        "orchestrator_start": round(rss_start, 1),
        "orchestrator_end": round(_rss_mb(), 1),
        # one entry per run worker and phase (each phase starts fresh workers)
        **{key: [v for m in mems for v in m[key]] for key in
           ("worker_after_first_run", "worker_after_last_run", "worker_max", "worker_growth_after_warmup")},
        "step_process_max": max(m["step_process_max"] for m in mems),
        "samples": sum(m["samples"] for m in mems),
    }
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    shutil.rmtree(work, ignore_errors=True)
    return report


def check(report: dict) -> list[str]:
    """The soak's pass conditions; returns what failed."""
    problems = []
    n = report["wells"]
    if report["partitions_registered"] != n:
        problems.append(f"expected {n} partitions")
    for phase, info in report["phases"].items():
        if info["runs_requested"] != n or info["runs_executed"] != n:
            got = f"{info['runs_requested']}/{info['runs_executed']}"
            problems.append(f"{phase}: expected {n} requests/runs, got {got}")
    if report["bad_inputs_registered"]:
        problems.append("a bad input was registered as a partition")
    if not report["every_partition_materialized_exactly_once"]:
        problems.append("not every partition materialized exactly once")
    trainings = len(PHASES) - 1
    if report["runs_failed"] or report["runs_succeeded"] != len(PHASES) * n + trainings \
            or report["training_runs_succeeded"] != trainings or any(report["worker_exit_codes"]):
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
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.train:
        return train(args.train)
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
