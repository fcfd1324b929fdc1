"""``benchmarks/scale.py`` end to end at 10^2 wells (SQLite, or PostgreSQL when
``PHENOCODER_TEST_POSTGRES_URL`` names a server): every figure is produced and consistent."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("phenocoder_scale_benchmark", REPO / "benchmarks" / "scale.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


@pytest.mark.parametrize(("wells", "plates"), [(10_000, 1000), (100_000, 1000), (30_000, 1000), (100, 10)])
def test_plate_sizes_sum_and_bounds(wells, plates):
    sizes = scale.plate_sizes(wells, plates, seed=0)
    assert sum(sizes) == wells and len(sizes) == plates
    assert min(sizes) >= 10 and max(sizes) <= 384
    assert sizes == scale.plate_sizes(wells, plates, seed=0)  # seeded


def test_plate_sizes_refuses_impossible_splits():
    with pytest.raises(ValueError, match="--wells 500000 cannot be split into --plates 1000"):
        scale.plate_sizes(500_000, 1000, seed=0)


def test_scale_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.delenv("PHENOCODER_SENSOR_RUNS", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # restored after the test
    monkeypatch.setenv("PHENOCODER_HOME", str(tmp_path))
    args = ["--wells", "100", "--plates", "10", "--new-plate-wells", "12", "--before-wells", "2",
            "--backfill-wells", "50", "--repeat", "1", "--workdir", str(tmp_path), "--out", str(tmp_path / "s.json")]
    results = scale.main(args)
    (run,) = results["runs"]
    assert run["wells"] == 100 and run["plates"] == 10
    assert run["storage"] == ("postgresql" if os.environ.get("PHENOCODER_TEST_POSTGRES_URL") else "sqlite")
    assert run["report_materializations"]["events"] == 300
    assert run["sensor_tick_all_present_s"] > 0
    new = run["new_plate"]
    assert new["one_run_per_plate"]["runs_queued"] == 1
    assert new["one_run_per_plate_partition_subset_events"]["runs_queued"] == 1
    assert new["one_run_per_well"]["runs_queued"] == 2
    for query in ("partition_stats", "partition_health", "stale_status_one_partition"):
        assert run["graphql"][query]["bytes"] > 50 and run["graphql"][query]["s"] > 0
    assert run["backfill"]["runs_created"] == 1  # 50 wells: one run of up to 384 wells
    assert run["dequeue"]["left_queued"] == 0 and run["dequeue"]["runs"] == 5  # 1 + 1 + 2 + backfill 1
    assert run["db_bytes_per_well"] > 0
    assert (tmp_path / "s.json").is_file()
