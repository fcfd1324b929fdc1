"""The benchmark suite ``benchmarks/run.py``: its plate assembly and summaries, and a smoke run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("phenocoder_benchmark_suite", REPO / "benchmarks" / "run.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

STAGES = ("ingest", "patches", "train_epoch", "encode", "message_passing", "cluster", "spatial_stats", "embedding")


def test_synthetic_plate_grows_by_wells_of_fixed_size_and_is_cached(tmp_path):
    from phenocoder_lib.ingest import read_plate

    plate = suite.synthetic_plate(tmp_path, 150, objects_per_well=30, template_wells=2)
    tables = sorted(p.stem for p in (plate / "tables").glob("*.csv"))
    assert len(tables) == 5 and len(set(tables)) == 5  # 150 / 30 wells, distinct names
    sdata = read_plate(plate)
    table = sdata.tables["nuclei_features"]
    counts = table.obs["well"].value_counts()
    assert set(counts.index) == set(tables) and counts.max() <= 30 and table.n_obs >= 0.9 * 150
    # wells reuse the 2 template wells' files (hard links), under their own names
    a01 = next((plate / "imgs").glob("*_A01_*"))
    a03 = next((plate / "imgs").glob(f"*_A03_{a01.name.split('_A01_')[1]}"))
    assert a01.stat().st_nlink >= 2 and a01.read_bytes() == a03.read_bytes()
    stamp = (plate / "tables" / "A01.csv").stat().st_mtime_ns
    assert suite.synthetic_plate(tmp_path, 150, objects_per_well=30, template_wells=2) == plate
    assert (plate / "tables" / "A01.csv").stat().st_mtime_ns == stamp  # cached: not written again
    assert len(suite._well_names(700)) == len(set(suite._well_names(700))) == 700


def test_slopes_and_memory_growth():
    recs = [{"stage": "s", "size": "1e4", "n_objects": 10_000, "wall_s": 2.0, "cpu_s": 1.0, "peak_rss_mb": 100.0},
            {"stage": "s", "size": "1e5", "n_objects": 100_000, "wall_s": 20.0, "cpu_s": 10.0, "peak_rss_mb": 110.0},
            {"stage": "s", "size": "1e6", "n_objects": 1_000_000, "wall_s": 2000.0, "cpu_s": 100.0,
             "peak_rss_mb": 1100.0}]
    scaling = suite._slope(recs, "s", ["1e4", "1e5", "1e6"], "wall_s")
    assert scaling["slope"] == 1.5 and scaling["cpu_slope"] == 1.0
    assert scaling["steps"] == {"1e4->1e5": 1.0, "1e5->1e6": 2.0}
    memory = suite._slope(recs, "s", ["1e4", "1e5", "1e6"], "peak_rss_mb")
    assert memory["growth"] == 11.0 and memory["n_growth"] == 100.0
    assert suite._slope(recs[:1], "s", ["1e4", "1e5"], "wall_s") is None


@pytest.mark.slow
def test_quick_suite_prints_one_json_document_with_every_stage(tmp_path):
    """``--quick`` on two tiny plates, without the baselines and the Dagster demo (each stage is a fresh
    process importing TensorFlow, scanpy and umap, so even this takes minutes on 2 cores)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--plate", "none",
                           "--no-baselines", "--no-dagster", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert report == json.loads(out.read_text())
    assert report["machine"]["cpus"] >= 1 and report["machine"]["versions"]["numpy"]
    sizes = ["400", "1600"]
    assert list(report["sizes"]) == sizes
    assert [report["sizes"][s]["n_wells"] for s in sizes] == [2, 8]  # fixed-size wells: the plate grows by wells
    records = {(r["stage"], r["size"]): r for r in report["stages"]}
    for stage in STAGES:
        for size in sizes:
            rec = records[(stage, size)]
            assert "error" not in rec, rec
            assert rec["wall_s"] > 0 and rec["cpu_s"] > 0 and rec["objects_per_s"] > 0 and rec["peak_rss_mb"] > 0
            expected = int(size) if stage != "train_epoch" else rec["n_train"] + rec["n_val"]
            assert abs(rec["n_objects"] - expected) <= 0.05 * int(size), rec  # a few nuclei may not fit
        assert isinstance(report["scaling"][stage]["slope"], float)
        assert report["memory"][stage]["peak_rss_mb"][1] > 0
    for stage in ("cluster", "spatial_stats"):
        assert records[(stage, "400")]["baseline"]["error"].startswith("not measured")
    partial = [json.loads(line) for line in out.with_suffix(".partial.jsonl").read_text().splitlines()]
    assert len(partial) == len(report["stages"])


def test_targets_print_goal_earlier_figure_and_this_runs_figure():
    records = [{"stage": "cluster", "size": "plate_3d", "wall_s": 1.5, "first_call_s": 3.25,
                "baseline": {"first_call_s": 31.0}},
               {"stage": "ingest", "size": "1e6", "error": "not measured: timeout after 3600 s"}]
    rows = {row["target"].split(",")[0]: row for row in suite._targets(records)}
    cluster = rows["clustering of 12"]
    assert cluster["goal"] == "< 5 s" and "26-30 s" in cluster["earlier"]
    assert cluster["now"] == 3.25 and cluster["baseline_now"] == 31.0 and cluster["now_field"] == \
        "cluster@plate_3d.first_call_s"
    assert rows["ingest at 10^6 objects"]["now"] == "not measured: timeout after 3600 s"
    assert rows["phenocoder demo (Dagster"]["now"] == "not measured in this run (dagster_demo at demo)"
    training = rows["training throughput on 2 CPU cores"]
    assert "now" not in training and training["measured_by"].startswith("benchmarks/train_plate.py")
    assert all({"target", "goal", "earlier"} <= set(row) for row in rows.values())


def test_gpu_check_falls_back_to_the_cpu_and_prints_throughput(tmp_path):
    """``gpu_check.sh`` without a GPU (forced): one JSON document, every figure measured on the CPU."""
    import os

    env = {**os.environ, "PHENOCODER_FORCE_CPU": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--n-synthetic", "400", "--cpu-n",
                           "400", "--epochs", "2", "--batch-sizes", "32", "--plate", "none"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no GPU: CPU fallback" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["device"] == "CPU" and report["fallback"] is True and report["n_gpus"] == 0
    run = report["synthetic"]["batch_32"]["cpu"]
    assert set(report["synthetic"]["batch_32"]) == {"cpu"}  # the same run is not repeated for the ratio
    assert run["n_patches"] == 400 and run["batch_size"] == 32 and run["gpus"] == []
    assert run["patches_per_s"] > 0 and len(run["train_seconds"]) == 2 and len(run["val_loss"]) == 2
    assert run["val_loss"][1] < run["val_loss"][0]  # it trained
    assert run["intra_op_threads"] == len(os.sched_getaffinity(0))
    assert report["gpu_over_cpu"] == {"batch_32": None} and "plate" not in report


def test_train_plate_ceiling_times_the_models_train_step():
    """``train_plate.py``'s ceiling: the example model's ``train_step`` on one fixed batch, in patches/s."""
    spec = importlib.util.spec_from_file_location("phenocoder_train_plate", REPO / "benchmarks" / "train_plate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    top = bench.ceiling(steps=3, rounds=2)
    assert top["batch_size"] == 64 and len(top["rounds"]) == 2
    assert top["patches_per_s"] == max(top["rounds"]) > 0


def test_spatial_power_true_types_retrieve_every_spatial_treatment_at_270_nuclei():
    """The ceiling of the arrangement features (true types): 270 nuclei per well retrieve every spatial
    treatment-dose, and at 90 the half-strength doses rank below the full ones."""
    spec = importlib.util.spec_from_file_location("phenocoder_spatial_power", REPO / "benchmarks" / "spatial_power.py")
    power = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(power)
    big = power.simulate(270, 0, null_size=2000)
    assert big["nuclei_placed"] == 270 and big["image_size"] == 444
    assert big["retrieved"] == 1.0 and big["map"] > 0.95
    small = power.simulate(90, 0, null_size=2000)
    doses = small["per_treatment_dose"]
    assert len(doses) == 6
    low = np.mean([v for k, v in doses.items() if k.endswith("0.5")])
    high = np.mean([v for k, v in doses.items() if k.endswith("1.0")])
    assert high > 0.95 and low < high


def test_plate_scan_builds_a_plate_of_linked_wells_and_compares_rescans_with_one_scan(tmp_path, capsys):
    """``plate_scan.py``: ``--wells`` hard-linked copies of one well, each file once in the scan; the per-well
    work with and without a rescan of the plate, in CPU seconds."""
    spec = importlib.util.spec_from_file_location("phenocoder_plate_scan", REPO / "benchmarks" / "plate_scan.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--wells", "30", "--slices", "2", "--sample", "2", "--workdir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out) == result
    assert (result["wells"], result["slices"], result["channels"]) == (30, 2, 4)
    assert result["files"] == 30 * 2 * (4 + 1 + 1) and result["sampled_wells"] == 2
    assert result["before_cpu_s_per_well"] > 0 and result["after_cpu_s_per_well"] > 0
    plate = tmp_path / "SCAN_W30_Z2"
    assert len(list((plate / "tables").iterdir())) == 60
    a01 = sorted((plate / "imgs").glob("*_A01_*"))[0]
    assert a01.stat().st_nlink == 31  # the seed well's file and its 30 copies
