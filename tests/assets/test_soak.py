"""Load: a reduced soak (benchmarks/soak.py) in CI; the full 96-well figures are in the README.

A synthetic plate of small wells and four bad inputs go into the landing folder; the sensor's run
requests execute with the multiprocess executor, two runs at a time, in three phases: sdata -> patches,
then (after a tiny model) latents, then (after the cluster reference) clusters -> graph_stats. Every
partition must be materialized exactly once per per-well asset, no run may fail, the bad inputs must
not become partitions, a final sensor tick must request nothing, and the run workers' memory must
stay flat. It runs on the embedded SQLite instance and, at half the size, on PostgreSQL
(``PHENOCODER_TEST_POSTGRES_URL``; the soak keeps a ``dagster.yaml`` found in ``<home>/dagster``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _instances import write_instance

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
#: Wells per backend (PostgreSQL at reduced size: the same code paths, half the runs).
WELLS = {"sqlite": 8, "postgres": 4}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(WELLS))
def test_reduced_soak_materializes_every_partition_exactly_once(tmp_path, backend):
    n_wells = WELLS[backend]
    if backend != "sqlite":
        write_instance(tmp_path / "home" / "dagster", backend)
    proc = subprocess.run([sys.executable, str(SOAK), "--wells", str(n_wells), "--concurrency", "2",
                           "--home", str(tmp_path / "home")], capture_output=True, text=True, timeout=1500)
    assert proc.stdout.strip(), proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["problems"] == [], report
    assert proc.returncode == 0
    assert report["partitions_registered"] == n_wells
    phases = report["phases"]
    assert list(phases) == ["ingest", "encode", "spatial"]
    assert [phases[p]["assets"] for p in phases] == [["patches", "sdata"], ["latents"], ["clusters", "graph_stats"]]
    assert all(phases[p]["runs_requested"] == phases[p]["runs_executed"] == n_wells for p in phases)
    assert phases["encode"]["model"]["ok"] and phases["spatial"]["cluster_reference"]["ok"]
    assert report["runs_requested"] == report["runs_executed"] == 3 * n_wells
    assert report["runs_succeeded"] == 3 * n_wells + 2 and report["training_runs_succeeded"] == 2  # + model, reference
    per_well = ("sdata", "patches", "latents", "clusters", "graph_stats")
    assert report["materializations"] == {a: n_wells for a in per_well}
    assert report["every_partition_materialized_exactly_once"] and report["runs_failed"] == 0
    assert report["bad_inputs_tried"] == 4 and report["bad_inputs_registered"] == 0
    assert report["second_sensor_tick_run_requests"] == 0 and report["staging_leftovers"] == 0
    assert all(growth < 150 for growth in report["memory_mb"]["worker_growth_after_warmup"])
    assert sorted(p.name for p in (tmp_path / "home" / "patches").iterdir()) == \
        [f"SOAK_{r}{c:02d}" for r, c in [("A", i + 1) for i in range(n_wells)]]
