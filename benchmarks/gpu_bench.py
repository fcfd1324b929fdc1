"""Training throughput on a GPU against the CPU, printed as one JSON document (run by ``gpu_check.sh``).

Usage (``benchmarks/gpu_check.sh`` installs what it needs first, then runs this)::

    python benchmarks/gpu_bench.py                                  # 10^6 synthetic patches + plate_3d
    python benchmarks/gpu_bench.py --n-synthetic 2000 --cpu-n 1000 --plate none --epochs 2   # smoke test

Measures, with the library's own defaults (``compile_model``: XLA on a GPU, off on a CPU; the thread pools of
``configure_tensorflow``), the example's model (conv layers 32, 64, 128, 16 latents, dense 64, an 8-wide
condition vector, flips):

- ``synthetic``: ``--n-synthetic`` seeded 32x32x4 uint8 patches (10^6 by default: 4 GiB in RAM, the distinct
  cell-like patches of ``train_speed.py`` repeated), ``--epochs`` epochs per batch size through the library's
  ``tf.data`` pipeline, on the GPU, and ``--cpu-n`` of them on the CPU (``CUDA_VISIBLE_DEVICES`` emptied);
  ``patches_per_s`` is the best epoch after the first (which holds tracing and compilation);
  ``gpu_over_cpu`` = GPU patches/s / CPU patches/s per batch size;
- ``plate``: ``--plate`` (default ``../shared/data/plate_3d``) read, cut into patches and trained for
  ``--plate-epochs`` epochs through ``Phenocoder.initialize_model``/``train`` (the code the Dagster ``model``
  asset runs), on the GPU when there is one.

Without a GPU every figure is measured on the CPU, ``device`` says ``"CPU"`` and ``fallback`` is true.
Each measurement runs in its own process, so the CPU runs never see the GPU.
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

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PLATE = ROOT / ".." / "shared" / "data" / "plate_3d"


def _gpus() -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def run_synthetic(n: int, batch_size: int, epochs: int, seed: int) -> dict:
    """Train the example model on ``n`` synthetic patches on this process's device."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    import keras
    import numpy as np
    import pandas as pd
    from train_speed import _patches

    from phenocoder_lib import training as T
    from phenocoder_lib.models import make_model

    settings = T.configure_tensorflow()
    base, cond_base = _patches(min(n, 50_000), seed)
    reps = np.arange(n) % len(base)
    raw, cond = base[reps], cond_base[reps]
    del base
    data = T.PatchData(index=pd.DataFrame({"i": np.arange(n)}), low=np.zeros((1, 4), np.float32),
                       inv=np.full((1, 4), 1 / 255, np.float32), scale=True, conditions=cond,
                       patch_shape=(32, 32, 4), dtype=np.uint8, stores=[], block_start=np.array([0, n]),
                       block_group=np.array([0]), raw=raw)
    n_val = max(n // 10, 1)
    train = T.make_batches(data, np.arange(n_val, n), batch_size=batch_size, shuffle=True, flip=True, seed=seed)
    val = T.make_batches(data, np.arange(n_val), batch_size=batch_size, seed=seed)
    keras.utils.set_random_seed(seed)
    model = make_model(input_shape=(32, 32, 4), n_latent_dim=16, n_dense_dim=64, conv_layers=(32, 64, 128),
                       dropout=0.25, beta=0.01, n_conditions=8, seed=seed)
    T.compile_model(model, 1e-3)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.done = time.perf_counter(), False

        def on_test_begin(self, logs=None):
            if not self.done:
                times.append(time.perf_counter() - self.t0)
                self.done = True

    hist = model.fit(train.keras_input(), validation_data=val.keras_input(), epochs=epochs, verbose=0,
                     callbacks=[Timer()], shuffle=False)
    n_train = n - n_val
    return {"n_patches": n, "batch_size": batch_size, "epochs": epochs, **settings, "gpus": _gpus(),
            "train_seconds": [round(t, 3) for t in times],
            "patches_per_s": round(n_train / min(times[1:] or times)),
            "val_loss": [round(float(v), 3) for v in hist.history["val_loss"]]}


def run_plate(plate: Path, epochs: int, seed: int) -> dict:
    """The example workflow's model on a real plate, through the ``Phenocoder`` facade."""
    sys.path[:0] = [str(ROOT)]
    from phenocoder_lib import Phenocoder
    from phenocoder_lib.ingest import read_plate

    t0 = time.perf_counter()
    sdata = read_plate(plate, pixel_size_um=1.288, z_step_um=10.0, table_scale=4.0)
    with tempfile.TemporaryDirectory(prefix="phenocoder_gpu_") as tmp:
        pheno = Phenocoder(table_key="nuclei_features", sample_key="sample", image_key="IF", seed=seed)
        pheno.add_sdata(sdata)
        pheno.generate_dataset(dataset="d", dir_dataset=Path(tmp) / "data", patch_size=(32, 32),
                               spatial_key_index="spatial_index", progress=False)
        prep = time.perf_counter() - t0
        n_channels = len(sdata.tables["nuclei_features"].var_names)
        pheno.initialize_model(n_latent_dim=16, n_dense_dim=64, conditions=["dataset", "z"],
                               input_shape=(32, 32, n_channels), conv_layers=(32, 64, 128), flip=True)
        t = time.perf_counter()
        history = pheno.train(n_epochs=epochs, plot=False, verbose=0, early_stopping_patience=epochs)
        train_s = time.perf_counter() - t
    pps = history["train_patches_per_s"]
    return {"plate": str(plate.resolve()), "epochs": epochs, "gpus": _gpus(), "prepare_s": round(prep, 2),
            "train_s": round(train_s, 2), "train_patches_per_s": [round(v) for v in pps],
            "patches_per_s": round(max(pps[1:] or pps)), "val_loss": [round(v, 3) for v in history["val_loss"]]}


def _child(kind: str, args: argparse.Namespace, *, cpu: bool, **kw) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, __file__, "--child", json.dumps({"kind": kind, **kw, "seed": args.seed})]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    if proc.returncode:
        return {"error": " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"rc={proc.returncode}"}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_s"] = round(time.perf_counter() - t, 1)
    return rec


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-synthetic", type=int, default=1_000_000, help="synthetic patches on the GPU")
    parser.add_argument("--cpu-n", type=int, default=20_000, help="synthetic patches on the CPU (for the ratio)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the synthetic runs (>= 2: the first "
                        "holds the compilation)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--plate", default=None, help="real plate (default ../shared/data/plate_3d; 'none': skip)")
    parser.add_argument("--plate-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        rec = run_synthetic(**spec) if kind == "synthetic" else run_plate(Path(spec["plate"]), spec["epochs"],
                                                                            spec["seed"])
        print(json.dumps(rec))
        return rec

    probe = subprocess.run([sys.executable, "-c", "import tensorflow as tf; "
                            "print(len(tf.config.list_physical_devices('GPU')))"],
                           capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                           check=False)
    n_gpus = int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0
    device = "GPU" if n_gpus else "CPU"
    report: dict = {"benchmark": "phenocoder GPU check", "device": device, "fallback": not n_gpus,
                    "n_gpus": n_gpus, "cpus": len(os.sched_getaffinity(0)), "load_avg_start": os.getloadavg(),
                    "synthetic": {}, "gpu_over_cpu": {}}
    for bs in args.batch_sizes:
        main_run = _child("synthetic", args, cpu=not n_gpus, n=args.n_synthetic, batch_size=bs, epochs=args.epochs)
        cpu_run = main_run if not n_gpus and args.cpu_n == args.n_synthetic else \
            _child("synthetic", args, cpu=True, n=args.cpu_n, batch_size=bs, epochs=args.epochs)
        runs = {device.lower(): main_run}
        if cpu_run is not main_run:
            runs["cpu" if n_gpus else "cpu_small"] = cpu_run
        report["synthetic"][f"batch_{bs}"] = runs
        if n_gpus and "patches_per_s" in main_run and "patches_per_s" in cpu_run:
            report["gpu_over_cpu"][f"batch_{bs}"] = round(main_run["patches_per_s"] / cpu_run["patches_per_s"], 2)
        else:
            report["gpu_over_cpu"][f"batch_{bs}"] = None
    plate = None if args.plate == "none" else Path(args.plate) if args.plate else \
        DEFAULT_PLATE if (DEFAULT_PLATE / "imgs").is_dir() else None
    if plate is not None:
        report["plate"] = {device.lower(): _child("plate", args, cpu=not n_gpus, plate=str(plate),
                                                  epochs=args.plate_epochs)}
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
