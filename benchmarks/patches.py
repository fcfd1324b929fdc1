"""Benchmark: plate ingest and patch extraction; prints one JSON document.

    python benchmarks/patches.py [PLATE] [--patch-size 32]

PLATE defaults to ../shared/data/plate_3d (the real plate, if present) or a generated synthetic plate.
Each stage runs in its own process so its peak RSS is its own. The baseline, measured in the same run on
the same well, is the earlier library's method: load the well's whole stack as float32, crop each object
in a Python loop and save one .npy file per object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "plate_3d"
REAL_GEOMETRY = {"pixel_size_um": 1.288, "z_step_um": 10.0, "table_scale": 4.0}


def _read(plate: Path):
    from phenocoder_lib.ingest import read_plate

    geometry = REAL_GEOMETRY if plate.resolve() == REAL.resolve() else {}
    return read_plate(plate, **geometry)


def stage_ingest(plate: Path, out: Path, patch_size: int) -> dict:
    from phenocoder_lib.ingest import write_sdata

    t = time.perf_counter()
    sdata = _read(plate)
    t_read = time.perf_counter() - t
    write_sdata(sdata, out / "plate.zarr")
    return {"n_objects": len(sdata.tables["nuclei_features"]), "read_s": t_read,
            "read_and_write_zarr_s": time.perf_counter() - t}


def stage_patches(plate: Path, out: Path, patch_size: int) -> dict:
    from phenocoder_lib.patches import generate_dataset

    sdata = _read(plate)
    t = time.perf_counter()
    ds = generate_dataset(sdata, dataset="bench", dir_dataset=out, table_key="nuclei_features",
                          sample_key="sample", image_key="IF", patch_size=patch_size)
    wall = time.perf_counter() - t
    n = len(ds.index)
    return {"n_patches": n, "wall_s": wall, "patches_per_s": n / wall}


def stage_baseline(plate: Path, out: Path, patch_size: int) -> dict:
    """The earlier library's method on the smallest well (whole float32 stack, per-object loop, .npy files)."""
    import numpy as np

    sdata = _read(plate)
    table = sdata.tables["nuclei_features"]
    sizes = table.obs["sample"].value_counts()
    sample = sizes.index[-1]
    rows = np.flatnonzero(table.obs["sample"].to_numpy() == sample)
    idx = table.obsm["spatial_index"][rows]
    t = time.perf_counter()
    stack = np.asarray(sdata.images[f"IF_{sample}"]).astype(np.float32)
    low = np.percentile(stack, 1, axis=(2, 3)).min(1)
    high = np.percentile(stack, 99, axis=(2, 3)).max(1) + 1
    half = patch_size // 2
    n = 0
    for i, (y, x, *z) in enumerate(idx):
        if not (half <= y < stack.shape[-2] - half and half <= x < stack.shape[-1] - half):
            continue  # the earlier library drops border objects
        plane = stack[:, z[0]] if z else stack
        patch = plane[:, y - half: y + half, x - half: x + half]
        patch = np.clip((patch - low[:, None, None]) / (high - low)[:, None, None], 0, 1)
        np.save(out / f"{sample}_{i}.npy", patch)
        n += 1
    wall = time.perf_counter() - t
    return {"sample": str(sample), "n_patches": n, "wall_s": wall, "patches_per_s": n / wall}


STAGES = {"ingest": stage_ingest, "patches": stage_patches, "baseline_earlier_method": stage_baseline}


def _run_stage(name: str, plate: Path, patch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, __file__, str(plate), "--stage", name, "--out", tmp, "--patch-size", str(patch_size)],
            capture_output=True, text=True, check=True,
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("plate", nargs="?")
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--stage", choices=list(STAGES))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.stage:
        result = STAGES[args.stage](Path(args.plate), Path(args.out), args.patch_size)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    tmp = None
    if args.plate:
        plate = Path(args.plate)
    elif (REAL / "imgs").is_dir():
        plate = REAL
    else:
        from phenocoder_lib.synthetic import make_synthetic_plate

        tmp = tempfile.TemporaryDirectory()
        plate = Path(tmp.name) / "synthetic"
        make_synthetic_plate(plate, n_wells=3, image_size=512, n_z=8, nuclei_per_well=800)
    results = {name: _run_stage(name, plate, args.patch_size) for name in STAGES}
    per_object_speedup = results["patches"]["patches_per_s"] / results["baseline_earlier_method"]["patches_per_s"]
    print(json.dumps({
        "benchmark": "ingest_and_patches",
        "plate": str(plate),
        "patch_size": args.patch_size,
        "cpu_count": os.cpu_count(),
        "stages": results,
        "ratios": {"patches_per_s_vs_earlier_method": per_object_speedup},
        "goals": {"patches_wall_s_lt": 10, "patches_peak_rss_mb_lt": 1500},
    }, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
