"""What a plate-wide file scan per well costs a plate run, and what one scan per plate saves.

    python benchmarks/plate_scan.py                        # 384 wells x 52 slices x 4 channels (120k files)
    python benchmarks/plate_scan.py --wells 96 --slices 26 --sample 8

A confocal screen plate is 384 wells x ~50 slices x 4 channels: about 80,000 image files plus a mask and a
table per slice, 120,000 files in three folders. :func:`phenocoder_lib.ingest.scan_plate` lists and matches
them all; a well read with ``read_plate(root, wells=[w])`` scans the whole plate again, and the ``sdata``
asset used to do so twice per well (once for the well's digest, which also took the stat of every file of
the plate, once to read it): a plate run was quadratic in the plate's size. Now the plate is scanned once
per run and each well gets its own :meth:`~phenocoder_lib.ingest.PlateFiles.per_well` files.

The plate is one small synthetic well (64x64 pixels, a few nuclei) whose files are hard-linked (or copied)
under every well name (the pixels do not matter here, the number of files does). Measured, in CPU seconds
per well over ``--sample`` wells: ``before`` = ``source_digest`` (scan + digest of the plate) + ``read_plate``
that scans (the step's work per well before, with today's faster scan: the old one cost more still),
``after`` = the well's digest + ``read_plate(files=...)`` from the one scan; and ``scan_s``, one scan of the
plate. ``plate_overhead_s`` = the difference times the wells: what a plate run spent on rescans. Reading
only (lazy images); writing a well is the same either way. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _well_names(n: int) -> list[str]:
    rows = [chr(ord("A") + i) for i in range(16)] + [f"A{chr(ord('A') + i)}" for i in range(16)]
    return [f"{r}{c:02d}" for r in rows for c in range(1, 25)][:n]


def build(workdir: Path, wells: int, slices: int) -> Path:
    """A plate of ``wells`` copies (hard links) of one synthetic well; returns its folder."""
    from phenocoder_lib.synthetic import make_synthetic_plate

    root = workdir / f"SCAN_W{wells}_Z{slices}"
    if (root / "EXPORT_COMPLETE").exists():
        return root
    seed = workdir / f"seed_Z{slices}"
    if not (seed / "EXPORT_COMPLETE").exists():
        make_synthetic_plate(seed, n_wells=1, ndim=3, n_channels=4, image_size=64, n_z=slices, nuclei_per_well=6,
                             seed=0)
    for folder in ("imgs", "labels", "tables"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(seed / folder)):
            for well in _well_names(wells):
                target = name.replace("_A01_", f"_{well}_") if folder != "tables" else name.replace("A01", well, 1)
                if not (root / folder / target).exists():
                    try:
                        os.link(seed / folder / name, root / folder / target)
                    except OSError:  # a file system without hard links: a copy (the same files, more disk)
                        shutil.copyfile(seed / folder / name, root / folder / target)
    (root / "plate.json").write_bytes((seed / "plate.json").read_bytes())
    (root / "EXPORT_COMPLETE").touch()
    return root


def measure(root: Path, sample: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from phenocoder_assets.sensors import well_digests
    from phenocoder_lib.ingest import read_plate, scan_plate

    def cpu(fn) -> float:
        c = time.process_time()
        fn()
        return time.process_time() - c

    scan_s = [cpu(lambda: scan_plate(root)) for _ in range(3)]
    files = scan_plate(root)
    wells = files.wells[:: max(1, len(files.wells) // sample)][:sample]
    own = files.per_well(wells)
    read_plate(root, wells=wells[:1], files=own[wells[0]])  # imports and caches warm
    before, after = [], []
    for well in wells:  # alternating, so a change of load hits both
        before.append(cpu(lambda w=well: (well_digests(root, scan_plate(root), [])[w],
                                          read_plate(root, wells=[w]))))
        after.append(cpu(lambda w=well: (well_digests(root, own[w], [])[w],
                                         read_plate(root, wells=[w], files=own[w]))))
    n_files = len(files.images) + len(files.labels) + len(files.tables)
    b, a = statistics.median(before), statistics.median(after)
    return {"wells": len(files.wells), "slices": len(files.z_levels), "channels": len(files.channels),
            "files": n_files, "scan_s": round(min(scan_s), 3), "sampled_wells": len(wells),
            "before_cpu_s_per_well": round(b, 4), "after_cpu_s_per_well": round(a, 4),
            "ratio": round(b / a, 2), "plate_overhead_s": round((b - a) * len(files.wells), 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=384)
    ap.add_argument("--slices", type=int, default=52)
    ap.add_argument("--sample", type=int, default=6, help="wells measured (spread over the plate)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the plate here (default: a temporary folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        root = build(workdir, args.wells, args.slices)
        print(f"plate ready in {time.perf_counter() - t0:.1f} s: {root}", file=sys.stderr)
        result = measure(root, args.sample)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
