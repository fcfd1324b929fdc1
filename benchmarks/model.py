"""Training and encoding throughput of the CVAE on a plate, printed as JSON.

Usage::

    python benchmarks/model.py                      # ../shared/data/plate_3d when present, else synthetic
    python benchmarks/model.py --plate PATH --pixel-size 1.288 --z-step 10 --table-scale 4
    python benchmarks/model.py --synthetic --conv-layers 16 32 64 --epochs 3

Measures, at 32x32 patches by default:

- ``patches``: seconds to generate the patch dataset (not a goal here; see benchmarks of the patches);
- ``train``: per epoch the wall time (training pass + validation pass) and the training throughput in
  patches/s; epoch 1 includes the graph tracing, so ``steady`` summarizes the later epochs, and
  ``seconds_per_12k_patches`` extrapolates the steady training throughput to the plate's ~12k patches
  (goal: < 5 s);
- ``encode``: objects/s of ``Phenocoder.encode`` over every object, reading the stored patches and,
  separately, cutting them from the images (goal: >= 5,000 objects/s).

The machine's load average is reported because colleagues share the cores: throughput scales with
the share of the CPU this process gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_PLATE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "plate_3d"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plate", type=Path, default=None, help="plate export folder (default: plate_3d if present)")
    parser.add_argument("--synthetic", action="store_true", help="use a synthetic plate even if plate_3d exists")
    parser.add_argument("--pixel-size", type=float, default=1.288)
    parser.add_argument("--z-step", type=float, default=10.0)
    parser.add_argument("--table-scale", type=float, default=4.0)
    parser.add_argument("--patch-size", type=int, default=32)
    parser.add_argument("--conv-layers", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--dense", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--encode-batch-size", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--conditions", nargs="*", default=["dataset", "z"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from phenocoder_lib import Phenocoder
    from phenocoder_lib.encoding import UnseenConditionWarning
    from phenocoder_lib.ingest import read_plate
    from phenocoder_lib.synthetic import make_synthetic_plate

    result: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
                                "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="phenocoder_bench_model_") as tmp:
        tmp = Path(tmp)
        plate = args.plate or (DEFAULT_PLATE if DEFAULT_PLATE.exists() and not args.synthetic else None)
        t = time.perf_counter()
        if plate is not None:
            sdata = read_plate(plate, pixel_size_um=args.pixel_size, z_step_um=args.z_step,
                               table_scale=args.table_scale)
            result["plate"] = str(Path(plate).resolve())
        else:
            make_synthetic_plate(tmp / "plate", n_wells=3, image_size=512, n_z=6, nuclei_per_well=2000,
                                 seed=args.seed)
            sdata = read_plate(tmp / "plate")
            result["plate"] = "synthetic (3 wells, 512 px, 6 z)"
        result["ingest_s"] = round(time.perf_counter() - t, 2)
        pheno = Phenocoder(sdata=sdata, seed=args.seed)
        n_objects = sdata.tables[pheno.table_key].n_obs
        n_channels = len(sdata.images[next(iter(sdata.images))].coords["c"])
        t = time.perf_counter()
        pheno.generate_dataset("bench", tmp / "data", patch_size=args.patch_size, progress=False)
        result["patches"] = {"n_objects": n_objects, "seconds": round(time.perf_counter() - t, 2)}

        t = time.perf_counter()
        pheno.initialize_model(args.latent, args.dense, args.conditions, batch_size=args.batch_size,
                               input_shape=(args.patch_size, args.patch_size, n_channels),
                               conv_layers=tuple(args.conv_layers), flip=True)
        init_s = time.perf_counter() - t
        history = pheno.train(n_epochs=args.epochs, plot=False, verbose=0, early_stopping_patience=args.epochs)
        steady = history["train_patches_per_s"][1:] or history["train_patches_per_s"]
        steady_epoch = history["epoch_seconds"][1:] or history["epoch_seconds"]
        best = max(steady)
        result["train"] = {
            "conv_layers": args.conv_layers, "batch_size": args.batch_size, "conditions": args.conditions,
            "n_train": pheno.model_config["split"]["n_train"], "n_val": pheno.model_config["split"]["n_val"],
            "initialize_s": round(init_s, 2),
            "epoch_seconds": [round(v, 2) for v in history["epoch_seconds"]],
            "train_seconds": [round(v, 2) for v in history["train_seconds"]],
            "train_patches_per_s": [round(v) for v in history["train_patches_per_s"]],
            "steady": {"epoch_seconds_min": round(min(steady_epoch), 2), "train_patches_per_s_max": round(best)},
            "seconds_per_12k_patches": round(12_000 / best, 2),
            "goal_seconds_per_12k_patches": 5.0,
        }

        encode = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnseenConditionWarning)
            pheno.encode(progress=False, samples=[pheno.open_datasets()[0].samples[0]])  # trace once
            for bs in args.encode_batch_size:
                for use_store in (True, False):
                    t = time.perf_counter()
                    table = pheno.encode(batch_size=bs, progress=False, use_store=use_store)
                    dt = time.perf_counter() - t
                    encode[f"batch_{bs}_{'store' if use_store else 'images'}"] = {
                        "seconds": round(dt, 2), "objects_per_s": round(table.n_obs / dt)}
            t = time.perf_counter()
            table = pheno.encode(batch_size=max(args.encode_batch_size), progress=False,
                                 spatial_message_passing_radius=25.0)
            encode["with_message_passing_r25"] = {"seconds": round(time.perf_counter() - t, 2),
                                                  "objects_per_s": round(table.n_obs / (time.perf_counter() - t))}
        encode["goal_objects_per_s"] = 5000
        encode["n_objects"] = int(table.n_obs)
        result["encode"] = encode
    result["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
