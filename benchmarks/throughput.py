"""Wells per hour through ``sdata -> patches -> latents``: one run per well vs one run per plate.

A synthetic plate of ``--wells`` wells (hard links of two tiny template wells) goes through the
``sample_pipeline`` job twice, each time into a fresh storage root and with the default
multiprocess executor, every run in its own Python process (as the run launcher of ``dagster dev``
starts them):

* ``per_well``: one run per well (``PHENOCODER_SENSOR_RUNS=well``), each paying the process start,
  the imports (TensorFlow among them) and the model load;
* ``per_plate``: one run over the plate's partition range with the sensor's plate-run tags
  (the default), which records one materialization per well.

A small model is trained first (not timed). Prints JSON with wells/hour of both and their ratio.

    python benchmarks/throughput.py --wells 96
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SELECTION = ("sdata", "patches", "latents")
PATCH = {"patch_size": [16, 16]}


def _log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def sample_pipeline_job():
    from phenocoder_assets.definitions import build_definitions

    return build_definitions().resolve_job_def("sample_pipeline")


def run_config(home: str) -> dict:
    return {"resources": {"storage": {"config": {"root": home}}}, "ops": {"patches": {"config": PATCH}}}


def run_one(args: dict) -> int:
    """One run in this process: ``keys`` (one key, or a plate range), ``home``, ``dagster_home``."""
    from dagster import AssetKey, DagsterInstance, execute_job, reconstructable

    from phenocoder_assets.wells import DEFER_EVENTS_TAG, PLATE_RUN_TAG

    keys = args["keys"]
    if len(keys) == 1:
        tags = {"dagster/partition": keys[0]}
    else:
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1],
                PLATE_RUN_TAG: args["plate"], DEFER_EVENTS_TAG: "true"}
    with DagsterInstance.from_config(args["dagster_home"]) as instance:
        with execute_job(reconstructable(sample_pipeline_job), instance=instance, run_config=run_config(args["home"]),
                         tags=tags, asset_selection=[AssetKey(a) for a in SELECTION]) as result:
            return 0 if result.success else 1


def _subprocess_run(payload: dict) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(payload)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"run {payload['keys'][:2]}... failed:\n{proc.stderr[-3000:]}")


def prepare(workdir: Path, n_wells: int, seed: int) -> tuple[Path, list[str]]:
    """Plate (hard links), a storage root with a trained model; returns (plate folder, well keys)."""
    import importlib.util

    from dagster import DagsterInstance, materialize

    from phenocoder_assets.definitions import ASSETS
    from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage
    from phenocoder_lib.ingest import sample_id, scan_plate

    spec = importlib.util.spec_from_file_location("phenocoder_benchmark_suite", REPO / "benchmarks" / "run.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    plate = suite.synthetic_plate(workdir, n_wells * 40, objects_per_well=40, template_wells=2)
    wells = scan_plate(plate, plate="PLATE").wells
    keys = [sample_id("PLATE", w) for w in wells]
    model_home = workdir / "model_home"
    resources = {"storage": PhenocoderStorage(root=str(model_home)), "mlflow": MLflowTracking(root=str(model_home))}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("samples", keys[:2])
    t0 = time.perf_counter()
    for key in keys[:2]:
        res = materialize(ASSETS, selection=["sdata", "patches"], partition_key=key, instance=instance,
                          resources=resources, run_config={"ops": {"sdata": {"config": {"plate_dir": str(plate)}},
                                                                   "patches": {"config": PATCH}}})
        assert res.success
    res = materialize(ASSETS, selection=["model"], instance=instance, resources=resources, run_config={"ops": {
        "model": {"config": {"n_epochs": 2, "conv_layers": [8, 16], "n_latent_dim": 8, "n_dense_dim": 16,
                             "plot": False, "seed": seed}}}})
    assert res.success
    _log(f"trained the model in {time.perf_counter() - t0:.0f} s")
    return plate, keys


def fresh_home(workdir: Path, name: str, plate: Path) -> tuple[Path, Path]:
    """A storage root holding the trained model and the plate in its landing folder, and a DAGSTER_HOME."""
    import shutil

    home = workdir / name / "data"
    shutil.copytree(workdir / "model_home" / "model", home / "model")
    shutil.copytree(plate, home / "incoming" / "PLATE", copy_function=os.link)
    dagster_home = workdir / name / "dagster"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home, dagster_home


def measure(mode: str, workdir: Path, plate: Path, keys: list[str]) -> dict:
    from dagster import AssetKey, DagsterInstance

    home, dagster_home = fresh_home(workdir, mode, plate)
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("samples", keys)
    payload = {"home": str(home), "dagster_home": str(dagster_home), "plate": "PLATE"}
    t0 = time.perf_counter()
    if mode == "per_well":
        for i, key in enumerate(keys):
            _subprocess_run({**payload, "keys": [key]})
            _log(f"{mode}: {i + 1}/{len(keys)} wells, {time.perf_counter() - t0:.0f} s")
    else:
        _subprocess_run({**payload, "keys": keys})
    seconds = time.perf_counter() - t0
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        done = {a: len(instance.get_materialized_partitions(AssetKey(a))) for a in SELECTION}
    if any(n != len(keys) for n in done.values()):
        raise RuntimeError(f"{mode}: materialized partitions {done}, expected {len(keys)} of each")
    return {"wells": len(keys), "s": round(seconds, 1), "s_per_well": round(seconds / len(keys), 2),
            "wells_per_hour": round(3600 * len(keys) / seconds), "materialized": done}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wells", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="folder for plates and instances (default: a temporary one)")
    parser.add_argument("--out")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        sys.exit(run_one(json.loads(args.run_one)))
    with tempfile.TemporaryDirectory(prefix="phenocoder-throughput-", dir=args.workdir) as tmp:
        plate, keys = prepare(Path(tmp), args.wells, args.seed)
        results = {"benchmark": "throughput", "stages": list(SELECTION), "executor": "multiprocess (default)",
                   "cpu_count": os.cpu_count()}
        for mode in ("per_plate", "per_well"):
            results[mode] = measure(mode, Path(tmp), plate, keys)
            _log(json.dumps(results[mode]))
        results["ratio_per_plate_vs_per_well"] = round(
            results["per_plate"]["wells_per_hour"] / results["per_well"]["wells_per_hour"], 2)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return results


if __name__ == "__main__":
    main()
