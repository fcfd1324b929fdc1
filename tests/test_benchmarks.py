"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` end to end on tiny plates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAGES = ("ingest", "patches", "train_epoch", "encode", "message_passing", "cluster", "spatial_stats", "embedding")


@pytest.mark.slow
def test_quick_suite_prints_one_json_document_with_every_stage(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--plate", "none",
                           "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)
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
    for stage, baseline in (("cluster", "scanpy"), ("spatial_stats", "squidpy")):
        rec = records[(stage, "400")]
        assert rec["baseline"]["wall_s"] > 0 and rec["ratio"] > 0, rec
        assert baseline in rec["baseline"]["what"]
    demo = records[("dagster_demo", "demo")]
    assert "error" not in demo, demo
    assert demo["wall_s"] > 0 and demo["n_wells"] == 2 and demo["n_objects"] > 0
