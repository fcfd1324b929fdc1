"""Training throughput of the CVAE under several settings, each against a baseline in the same run (JSON).

Usage::

    python benchmarks/train_speed.py                          # all variants, 2 rounds, 6,000 patches
    python benchmarks/train_speed.py --variants baseline graph lib --rounds 3 --n 12000 --epochs 10

Every variant trains the example's model (conv layers 32, 64, 128, latent 16, dense 64, the conditions
"dataset" and "z" as an 8-wide condition vector, flips on) for ``--epochs`` epochs on the same seeded
synthetic 32x32x4 uint8 patches held in RAM, through the library's ``tf.data`` pipeline, in a fresh
process (thread pools and the mixed-precision policy are fixed when TensorFlow starts). The first epoch
holds the graph tracing and XLA compilation, so ``patches_per_s`` is the best later epoch's training
pass. Variants run alternately, round after round, so a colleague's load hits them alike; the report
gives each variant's median and its ratio to the baseline's median, in wall time (``patches_per_s``) and
per CPU second of the process (``patches_per_cpu_s``: less sensitive to a shared machine's load).

Variants (a name is settings joined by ``_``; ``baseline`` is the library before any of them: float32,
one step per graph call, each batch gathered in a numpy call inside ``tf.data``):

- ``threads``: ``tf.config.threading`` intra-/inter-op threads = the process's cores (the library sets them
  when :mod:`phenocoder_lib.models` is imported, so every variant has them);
- ``graph``: batches gathered by index inside the ``tf.data`` graph from the in-memory patch tensor
  (``make_batches(in_graph=True)``; one numpy call per epoch);
- ``xla``: ``jit_compile=True`` (XLA) for the training and validation steps;
- ``bf16``: the ``mixed_bfloat16`` Keras policy (bfloat16 convolutions, float32 weights and loss);
- ``bs128`` / ``bs256``: batch size (default 64);
- ``spe8`` / ``spe16`` ...: Keras ``steps_per_execution`` (training steps per call into the graph);
- ``lib``: the library's defaults of today (:func:`phenocoder_lib.training.configure_tensorflow`,
  :func:`~phenocoder_lib.training.make_batches`, :func:`~phenocoder_lib.training.compile_model` and the
  model built under :func:`~phenocoder_lib.training.mixed_precision_policy`), whatever they are;
  ``lib_fp32``: the same with ``PHENOCODER_MIXED_PRECISION=0`` (float32 everywhere); ``lib_mp``: with
  ``PHENOCODER_MIXED_PRECISION=1`` (also bfloat16 on a CPU that has it).

Each run also reports its peak resident memory (``peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_VARIANTS = ["baseline", "graph", "spe8", "bf16", "lib", "lib_mp"]


def _patches(n: int, seed: int):
    """Seeded uint8 patches of a few blurred blobs (cell-like), 32x32x4, and an 8-wide condition vector."""
    import numpy as np

    from phenocoder_lib.training import aligned_empty

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    # 64-byte aligned, as load_patch_data allocates it: the in-graph pipeline then uses it without a copy
    out = aligned_empty((n, 32, 32, 4), np.uint8)
    for start in range(0, n, 1000):
        m = min(1000, n - start)
        cy, cx = rng.normal(16, 3, (2, m, 1, 1))
        r = rng.uniform(4, 10, (m, 1, 1))
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
        amp = rng.uniform(0.3, 1.0, (m, 1, 1, 4))
        img = blob[..., None] * amp + rng.normal(0, 0.05, (m, 32, 32, 4))
        out[start:start + m] = np.clip(img * 255, 0, 255).astype(np.uint8)
    cond = np.zeros((n, 8), np.float32)
    cond[np.arange(n), rng.integers(0, 6, n)] = 1.0
    cond[:, 6] = 1.0
    cond[:, 7] = rng.uniform(0, 1, n)
    return out, cond


def worker(variant: str, n: int, epochs: int, seed: int) -> dict:
    """Train one variant in this process; return its epoch timings and losses."""
    parts = set(variant.split("_"))
    if "fp32" in parts:
        os.environ["PHENOCODER_MIXED_PRECISION"] = "0"
    if "mp" in parts:
        os.environ["PHENOCODER_MIXED_PRECISION"] = "1"
    import resource

    import keras
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from phenocoder_lib import training as T
    from phenocoder_lib.models import make_model

    cores = len(os.sched_getaffinity(0))
    if "lib" in parts:
        settings = T.configure_tensorflow()
        jit, bs, spe, in_graph = settings.get("jit_compile", False), 64, None, None
        policy = T.mixed_precision_policy()
    else:
        policy = "mixed_bfloat16" if "bf16" in parts else "float32"
        in_graph = "graph" in parts
        if "threads" in parts:
            tf.config.threading.set_intra_op_parallelism_threads(cores)
            tf.config.threading.set_inter_op_parallelism_threads(cores)
        jit = "xla" in parts
        bs = 256 if "bs256" in parts else 128 if "bs128" in parts else 64
        spe = next((int(p[3:]) for p in parts if p.startswith("spe")), 1)
    raw, cond = _patches(n, seed)
    data = T.PatchData(index=pd.DataFrame({"i": np.arange(n)}), low=np.zeros((1, 4), np.float32),
                       inv=np.full((1, 4), 1 / 255, np.float32), scale=True, conditions=cond,
                       patch_shape=(32, 32, 4), dtype=np.uint8, stores=[], block_start=np.array([0, n]),
                       block_group=np.array([0]), raw=raw)
    n_val = n // 10
    train = T.make_batches(data, np.arange(n_val, n), batch_size=bs, shuffle=True, flip=True, seed=seed,
                           in_graph=in_graph)
    val = T.make_batches(data, np.arange(n_val), batch_size=bs, seed=seed, in_graph=in_graph)
    keras.utils.set_random_seed(seed)
    with T.dtype_policy(policy):
        model = make_model(input_shape=(32, 32, 4), n_latent_dim=16, n_dense_dim=64, conv_layers=(32, 64, 128),
                           dropout=0.25, beta=0.01, n_conditions=8, seed=seed)
    if "lib" in parts:
        T.compile_model(model, 1e-3)
    else:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit, steps_per_execution=spe)
    times: list[float] = []
    cpu: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.c0, self.done = time.perf_counter(), time.process_time(), False

        def on_test_begin(self, logs=None):
            if not self.done:
                times.append(time.perf_counter() - self.t0)
                cpu.append(time.process_time() - self.c0)
                self.done = True

    hist = model.fit(train.keras_input(), validation_data=val.keras_input(), epochs=epochs, verbose=0,
                     callbacks=[Timer()], shuffle=False)
    n_train = n - n_val
    return {"variant": variant, "batch_size": bs, "jit_compile": bool(model.jit_compile),
            "policy": model.dtype_policy.name, "in_graph": train.in_graph,
            "steps_per_execution": model.steps_per_execution,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "train_seconds": [round(t, 3) for t in times],
            "patches_per_s": round(n_train / min(times[1:] or times)),
            "patches_per_cpu_s": round(n_train / min(cpu[1:] or cpu)),
            "cpu_per_wall": round(sum(cpu[1:] or cpu) / sum(times[1:] or times), 2),
            "val_loss": [round(float(v), 3) for v in hist.history["val_loss"]]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--n", type=int, default=6000, help="patches (10%% validation)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.epochs, args.seed)))
        return {}
    if "baseline" not in args.variants:
        args.variants = ["baseline", *args.variants]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    for _ in range(args.rounds):
        for variant in args.variants:
            proc = subprocess.run([sys.executable, __file__, "--worker", variant, "--n", str(args.n), "--epochs",
                                   str(args.epochs), "--seed", str(args.seed)], capture_output=True, text=True,
                                  env=env, check=False)
            if proc.returncode:
                raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["patches_per_s"] for r in runs["baseline"])
    base_cpu = statistics.median(r["patches_per_cpu_s"] for r in runs["baseline"])
    result = {"n_patches": args.n, "epochs": args.epochs, "rounds": args.rounds,
              "cores": len(os.sched_getaffinity(0)),
              "load_avg_end": os.getloadavg(), "baseline_patches_per_s": base, "variants": {}}
    for variant, rs in runs.items():
        med = statistics.median(r["patches_per_s"] for r in rs)
        result["variants"][variant] = {
            "patches_per_s": [r["patches_per_s"] for r in rs], "median": med,
            "ratio_vs_baseline": round(med / base, 2),
            "patches_per_cpu_s": [r["patches_per_cpu_s"] for r in rs],
            "cpu_ratio_vs_baseline": round(statistics.median(r["patches_per_cpu_s"] for r in rs) / base_cpu, 2),
            "cpu_per_wall": [r["cpu_per_wall"] for r in rs], "batch_size": rs[0]["batch_size"],
            "jit_compile": rs[0]["jit_compile"], "policy": rs[0]["policy"], "in_graph": rs[0]["in_graph"],
            "steps_per_execution": rs[0]["steps_per_execution"],
            "peak_rss_mb": [r["peak_rss_mb"] for r in rs],
            "final_val_loss": [r["val_loss"][-1] for r in rs]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
