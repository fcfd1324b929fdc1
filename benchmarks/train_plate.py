"""Training on the real plate: this checkout against the library at a git ref, alternately, plus the kernel ceiling.

    python benchmarks/train_plate.py                          # vs d623c8b^ (before the training work), 2 rounds
    python benchmarks/train_plate.py --ref HEAD~3 --rounds 3 --epochs 10 --seed 0

The patch dataset of ``../shared/data/plate_3d`` (32x32x4, as ``examples/example_workflow.py`` makes it) is
built once in ``--workdir``; then the example model (conv 32, 64, 128, latent 16, dense 64, conditions
``dataset`` and ``z``, flips, batch 64, learning rate 1e-3) is trained for ``--epochs`` epochs with no previews,
each time in a fresh process: the library of ``--ref`` (checked out with ``git worktree`` into the workdir and
put first on ``PYTHONPATH``) and this checkout's, round after round in that order, so the machine's load hits
both. Per run: the wall seconds of the training passes (``passes_s``) and of ``fit`` (``fit_s``, validation,
checkpoints and graph tracing included), the median epoch after the first (``steady_epoch_s``), the best
validation loss (``best_val_loss``, full precision: equal seeds give equal losses when the arithmetic is the
same) and the peak resident memory. ``ratio`` = ref / current medians (> 1: faster now).

``ceiling`` is what the convolutions allow: the current model's ``train_step`` called in a loop on one fixed
batch (no input pipeline, no callbacks), in patches per second, after a warm-up; one training pass of the
current library at that rate would take ``n_train / ceiling`` seconds. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = "d623c8b^"  # main before the training-throughput work of issue 16
MODEL = dict(n_latent_dim=16, n_dense_dim=64, conditions=["dataset", "z"], input_shape=(32, 32, 4),
             conv_layers=(32, 64, 128), flip=True, batch_size=64)


def build_dataset(workdir: Path) -> Path:
    """The plate's patch dataset (as the example makes it), once; returns its folder."""
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    from patches import REAL, REAL_GEOMETRY

    from phenocoder_lib import Phenocoder
    from phenocoder_lib.ingest import read_plate

    folder = workdir / "dataset"
    if (folder / "dataset_1").is_dir():
        return folder
    if not (REAL / "imgs").is_dir():
        raise SystemExit(f"the real plate is not at {REAL}")
    pheno = Phenocoder(table_key="nuclei_features", sample_key="sample", image_key="IF")
    pheno.add_sdata(read_plate(REAL, **REAL_GEOMETRY))
    pheno.generate_dataset(dataset="dataset_1", dir_dataset=folder, patch_size=(32, 32),
                           spatial_key_index="spatial_index")
    return folder


def worker(dataset: Path, out: Path, epochs: int, seed: int) -> dict:
    """Train the example model once in this process (whichever ``phenocoder_lib`` is first on the path)."""
    from phenocoder_lib import Phenocoder

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.symlink(dataset / "dataset_1", out / "dataset_1")
    pheno = Phenocoder(table_key="nuclei_features", sample_key="sample", image_key="IF", seed=seed)
    pheno.data_dir, pheno.datasets = out, ["dataset_1"]
    pheno.initialize_model(**MODEL)
    t0 = time.perf_counter()
    history = pheno.train(n_epochs=epochs, plot=False, verbose=0)
    fit = time.perf_counter() - t0
    passes = [float(x) for x in history["train_seconds"]]
    n_train = round(float(history["train_patches_per_s"][0]) * passes[0])
    shutil.rmtree(out, ignore_errors=True)
    return {"library": str(Path(sys.modules["phenocoder_lib"].__file__).parent.parent), "fit_s": round(fit, 2),
            "n_train": n_train, "passes_s": round(sum(passes), 2), "epochs_s": [round(x, 2) for x in passes],
            "steady_epoch_s": round(statistics.median(passes[1:] or passes), 3),
            "best_val_loss": min(float(v) for v in history["val_loss"]),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def ceiling(steps: int = 150, rounds: int = 5) -> dict:
    """Patches per second of the model's ``train_step`` on one fixed batch, in a loop (best of ``rounds``)."""
    import keras
    import tensorflow as tf

    from phenocoder_lib import training as T
    from phenocoder_lib.models import make_model

    T.configure_tensorflow()
    model = make_model(input_shape=(32, 32, 4), n_latent_dim=16, n_dense_dim=64, conv_layers=(32, 64, 128),
                       dropout=0.25, beta=0.01, n_conditions=8, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    batch = 64
    x, c = tf.random.uniform((batch, 32, 32, 4), seed=1), tf.random.uniform((batch, 8), seed=2)
    step = tf.function(lambda x, c: model.train_step(((x, c),)))
    for _ in range(10):
        step(x, c)
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = step(x, c)
        float(out["loss"])
        rates.append(steps * batch / (time.perf_counter() - t0))
    return {"patches_per_s": round(max(rates)), "rounds": [round(r) for r in rates], "batch_size": batch}


def _child(args: list[str], pythonpath: str | None) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False,
                          cwd=pythonpath or ROOT)
    if proc.returncode:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default=REF, help="git ref of the library to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/phenocoder_train_plate"))
    ap.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ceiling", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]), args.epochs, args.seed)))
        return {}
    if args.ceiling:
        print(json.dumps(ceiling()))
        return {}
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(work)
    tree = work / "ref"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.ref], check=True,
                   capture_output=True)
    try:
        runs: dict[str, list[dict]] = {"ref": [], "current": []}
        common = ["--epochs", str(args.epochs), "--seed", str(args.seed)]
        for _ in range(args.rounds):
            runs["ref"].append(_child(["--worker", str(dataset), str(work / "out_ref"), *common], str(tree)))
            runs["current"].append(_child(["--worker", str(dataset), str(work / "out_current"), *common], None))
        top = _child(["--ceiling"], None)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    n_train = runs["current"][0]["n_train"]
    report = {"benchmark": "training on plate_3d", "ref": args.ref, "epochs": args.epochs, "seed": args.seed,
              "cores": len(os.sched_getaffinity(0)), "load_avg_end": [round(x, 2) for x in os.getloadavg()],
              "runs": runs,
              "median": {name: {key: med(name, key) for key in ("passes_s", "fit_s", "steady_epoch_s")}
                         for name in runs},
              "ratio": {key: round(med("ref", key) / med("current", key), 2)
                        for key in ("passes_s", "fit_s", "steady_epoch_s")},
              "same_loss": len({r["best_val_loss"] for rs in runs.values() for r in rs}) == 1,
              "ceiling": {**top, "n_train": n_train, "pass_s": round(n_train / top["patches_per_s"], 2),
                          "steady_epoch_vs_ceiling": round(n_train / top["patches_per_s"]
                                                           / med("current", "steady_epoch_s"), 2)}}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
