"""Ingest speed against the code before the ingest work, in one run, with a check that the outputs are identical.

    python benchmarks/ingest_speed.py                         # 10^5 objects (20 wells of 5,000), 2 rounds
    python benchmarks/ingest_speed.py --objects 2e4 --rounds 1 --workdir /tmp/ingbench

Each variant ingests every well as the Dagster ``sdata`` asset does (``read_plate(wells=[w])`` + ``write_sdata``,
one well at a time); ``baseline`` is ``phenocoder_lib/ingest.py`` of ``--baseline-ref`` (default: the commit
before the ingest work), loaded from git into a module of its own; ``current`` is this checkout's. The variants
alternate, round by round and in swapped order, in one process (imports and the plate's generation excluded),
so the load of a shared machine hits both; ``cpu_s`` (all threads) is the fairer figure there. ``ratio`` =
baseline / current (> 1: faster now). ``workers`` is this checkout's ``ingest_plate``: the same per-well work in
one worker process per core (``--workers``), as the ``sdata`` asset runs a plate, the pool's start included
(``cpu_s``: the workers'); ``ratio.workers_wall`` compares it with the baseline, ``workers_vs_current_wall`` with
``current``.

Identity: every file of each well's zarr store is hashed (SHA-256), for the synthetic plate, a small synthetic
3-D plate with several slices per object and ``../shared/data/plate_3d`` (when present); ``identical_files``
says whether both variants wrote the same bytes, ``identical_tables`` whether the tables read back are equal;
``times`` and ``ratio_*`` are those of that single pass (one round, baseline first).

The ingest at 10^6 objects is measured by ``benchmarks/run.py`` (stage ``ingest``, ``ingest_plate`` with workers).
Prints one JSON document (progress on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

BASELINE_REF = "f7d1255"  # main before the ingest work (issue 16)
TABLE = "nuclei_features"


def _log(msg: str) -> None:
    print(f"[ingest_speed] {msg}", file=sys.stderr, flush=True)


def load_baseline(ref: str):
    """``phenocoder_lib/ingest.py`` at git ``ref``, imported as ``phenocoder_lib._ingest_baseline``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:phenocoder_lib/ingest.py"],
                            check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="ingest_baseline_"))
    path = folder / "_ingest_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("phenocoder_lib._ingest_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)  # its relative imports (.keys, .io) resolve in phenocoder_lib
    return module


def ingest_plate(module, plate: Path, out: Path, geometry: dict) -> dict:
    """Every well, one at a time: ``read_plate(wells=[w])`` + ``write_sdata``; wall and CPU time of that work."""
    wells = module.scan_plate(plate).wells
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for well in wells:
        sdata = module.read_plate(plate, wells=[well], **geometry)
        module.write_sdata(sdata, out / f"{well}.zarr")
        n += sdata.tables[TABLE].n_obs
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"n_objects": n, "n_wells": len(wells), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "objects_per_s": round(n / wall), "objects_per_cpu_s": round(n / cpu)}


def ingest_in_workers(module, plate: Path, out: Path, workers: int | None) -> dict:
    """``ingest_plate``: the wells in worker processes, as the ``sdata`` asset in a plate run (pool start included)."""
    shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter()
    result = module.ingest_plate(plate, out, workers=workers)
    wall = time.perf_counter() - wall
    n, cpu = int(result["n_objects"].sum()), float(result["cpu_s"].sum())
    return {"n_objects": n, "n_wells": len(result), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "objects_per_s": round(n / wall), "objects_per_cpu_s": round(n / cpu),
            "workers": workers or "one per core"}


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _canonical(mapping: dict) -> str:
    # the read-back order of a zarr group's members is not fixed: compare key-sorted
    return json.dumps(mapping, default=lambda v: getattr(v, "tolist", lambda: str(v))(), sort_keys=True)


def tables_equal(a: Path, b: Path) -> bool:
    """The tables of every well's store, read back: same obs, X, obsm and uns."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    for store in sorted(a.glob("*.zarr")):
        ta = ad.read_zarr(store / "tables" / TABLE)
        tb = ad.read_zarr(b / store.name / "tables" / TABLE)
        try:
            pd.testing.assert_frame_equal(ta.obs, tb.obs, check_exact=True)
            np.testing.assert_array_equal(ta.X, tb.X)
            for key in ta.obsm:
                np.testing.assert_array_equal(ta.obsm[key], tb.obsm[key])
            assert set(ta.obsm) == set(tb.obsm) and _canonical(ta.uns) == _canonical(tb.uns)
        except AssertionError:
            return False
    return True


def compare(baseline, current, plate: Path, work: Path, geometry: dict) -> dict:
    """Ingest ``plate`` with both variants; whether the written stores are identical."""
    a, b = work / "baseline", work / "current"
    timed = {"baseline": ingest_plate(baseline, plate, a, geometry),
             "current": ingest_plate(current, plate, b, geometry)}
    da, db = file_digests(a), file_digests(b)
    differ = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
    result = {"plate": str(plate), "n_files": len(da), "identical_files": not differ, "differing_files": differ[:10],
              "identical_tables": tables_equal(a, b), "times": timed,
              "ratio_wall": round(timed["baseline"]["wall_s"] / timed["current"]["wall_s"], 2),
              "ratio_cpu": round(timed["baseline"]["cpu_s"] / timed["current"]["cpu_s"], 2)}
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=float, default=1e5, help="objects of the synthetic 2-D plate")
    ap.add_argument("--objects-per-well", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both variants (order swapped each round)")
    ap.add_argument("--baseline-ref", default=BASELINE_REF, help="git ref of the baseline ingest.py")
    ap.add_argument("--plate-3d", default=None, help="real 3-D plate for the identity check ('none' to skip)")
    ap.add_argument("--workdir", type=Path, default=None, help="plate cache (default: a temporary folder)")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes of the 'workers' variant (default: one per core)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON document here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import run  # benchmarks/run.py: the suite's cached synthetic plates
    from patches import REAL, REAL_GEOMETRY

    import phenocoder_lib.ingest as current
    from phenocoder_lib.synthetic import make_synthetic_plate

    baseline = load_baseline(args.baseline_ref)
    tmp = tempfile.TemporaryDirectory(prefix="ingest_speed_") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plate = run.synthetic_plate(workdir, int(args.objects), args.objects_per_well, 0)
    real = None if args.plate_3d == "none" else Path(args.plate_3d) if args.plate_3d else REAL
    report: dict = {"benchmark": "ingest speed", "baseline_ref": args.baseline_ref, "plate": str(plate),
                    "cpus": os.cpu_count(), "load_avg_start": [round(x, 2) for x in os.getloadavg()]}

    _log("identity checks ...")
    small = workdir / "plates" / "identity_3d"
    if not (small / "EXPORT_COMPLETE").exists():
        make_synthetic_plate(small, n_wells=2, ndim=3, n_z=5, image_size=96, nuclei_per_well=30, seed=3)
    checks = [compare(baseline, current, small, workdir / "cmp", {})]
    if real is not None and (real / "imgs").is_dir():
        checks.append(compare(baseline, current, real, workdir / "cmp", REAL_GEOMETRY))
    checks.append(compare(baseline, current, plate, workdir / "cmp", {}))
    report["identity"] = checks

    runs: dict[str, list[dict]] = {"baseline": [], "current": [], "workers": []}
    for r in range(args.rounds):
        order = ("baseline", "current", "workers") if r % 2 == 0 else ("workers", "current", "baseline")
        for name in order:
            _log(f"round {r + 1}: {name} ...")
            if name == "workers":
                runs[name].append(ingest_in_workers(current, plate, workdir / "out", args.workers))
            else:
                runs[name].append(ingest_plate(baseline if name == "baseline" else current, plate, workdir / "out",
                                               {}))
            _log(f"  {runs[name][-1]}")
    shutil.rmtree(workdir / "out", ignore_errors=True)

    def total(name: str, key: str) -> float:
        return sum(rec[key] for rec in runs[name])

    summary = {}
    for name in runs:
        n = total(name, "n_objects")
        summary[name] = {"objects_per_s": round(n / total(name, "wall_s")),
                         "objects_per_cpu_s": round(n / total(name, "cpu_s")),
                         "wall_s_per_well": round(total(name, "wall_s") / total(name, "n_wells"), 3),
                         "cpu_s_per_well": round(total(name, "cpu_s") / total(name, "n_wells"), 3)}
    report["runs"] = runs
    report["summary"] = summary
    report["ratio"] = {"wall": round(total("baseline", "wall_s") / total("current", "wall_s"), 2),
                       "cpu": round(total("baseline", "cpu_s") / total("current", "cpu_s"), 2),
                       "workers_wall": round(total("baseline", "wall_s") / total("workers", "wall_s"), 2),
                       "workers_vs_current_wall": round(total("current", "wall_s") / total("workers", "wall_s"), 2)}
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
