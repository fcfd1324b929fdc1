"""One benchmark suite: every stage of the pipeline at several plate sizes, printed as one JSON document.

    python benchmarks/run.py                          # 1e4, 1e5, 1e6 objects + plate_3d (when present)
    python benchmarks/run.py --sizes 1e4,1e5 --no-baselines --out /tmp/bench.json
    python benchmarks/run.py --quick                  # tiny plates (CI smoke test; minutes, mostly imports)

Plates: ``../shared/data/plate_3d`` (the real 3-D plate, when present; ``--plate PATH`` for another, ``--plate
none`` to skip) and synthetic 2-D plates of ``--objects-per-well`` objects per well (default 5,000: 2, 20 and
200 wells for 1e4, 1e5 and 1e6 objects, so "memory bounded by one well" is visible). A synthetic plate is
generated well by well (every well distinct by default; ``--template-wells N`` reuses N generated wells as hard
links, faster to make, but identical copies distort the clustering) and cached in ``--workdir``; generating it
is not a benchmarked stage.

Stages, each in its own Python process (so its peak RSS, ``ru_maxrss`` of that process, is its own and
TensorFlow/numba imports do not leak between stages); ``wall_s`` is timed inside the process around the work
itself (imports, reading the inputs of the stage and writing its outputs for the next one are excluded), and
``objects_per_s = n_objects / wall_s``; ``cpu_s`` is the CPU time of the process (all threads) over the same
work, which other load on the machine inflates much less than the wall time:

- ``ingest``: ``ingest_plate``: per well ``read_plate(wells=[w])`` + ``write_sdata``, the wells in one worker process
  per core where that pays (``--ingest-workers`` to choose), as the Dagster ``sdata`` asset does in a plate run;
  ``cpu_s`` and ``peak_rss_mb`` include the workers';
- ``patches``: ``generate_dataset`` (32x32) over the lazily read plate (``input_rss_mb``: the process before the
  call, the plate's table included); ``per_well``: the same per well in its own process, as the Dagster
  ``patches`` asset calls it (one well's SpatialData a call), with its own ``peak_rss_mb``;
- ``train_epoch``: one epoch of the CVAE (``conv_layers=(16, 32, 64)``, 16 latents, batch 128, no conditions)
  over every patch (training + validation pass; ``--train-max-objects N`` trains it on a seeded subsample, which
  the record then says);
- ``encode``: ``Phenocoder.encode`` of every object from the patch store;
- ``message_passing``: ``spatial_message_passing`` of the latents, radius 50 um, per well;
- ``cluster``: ``cluster_features`` (pooled PCA -> kNN -> Leiden); baseline: scanpy ``pca`` + ``neighbors`` +
  ``leiden`` (igraph) on the same latents;
- ``spatial_stats``: ``compute_spatial_stats`` (all six groups, radii 25 and 50 um) per well; baseline: squidpy's
  functions (``spatial_neighbors``, ``interaction_matrix``, ``nhood_enrichment``, ``centrality_scores``,
  ``spatial_autocorr`` of the latents and of the one-hot clusters) per well, see ``spatial_stats.py``;
- ``embedding``: ``spatialgraph_embedding`` of the per-well statistics;
- ``dagster_demo``: ``phenocoder_assets.cli.run_demo`` into a fresh home (once per suite run, not per size).

``targets``: each performance target, its goal, the measurement before the work on it (``earlier``) and this
run's figure (``now``) where a stage of the suite measures it; the others name the script that does.

``ratio`` = baseline wall / our wall (> 1: ours is faster). ``scaling[stage]`` is the slope of log(wall) against
log(n_objects) between the smallest and the largest synthetic size (1 = linear); ``memory[stage]`` the peak RSS
at those sizes. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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

from patches import REAL, REAL_GEOMETRY  # noqa: E402  (benchmarks/patches.py)

STAGES = ("ingest", "patches", "train_epoch", "encode", "message_passing", "cluster", "spatial_stats", "embedding")
BASELINES = {"cluster": "cluster_scanpy", "spatial_stats": "spatial_stats_squidpy"}
RADII = (25.0, 50.0)
MP_RADIUS = 50.0
PATCH = 32
WARM_KNN = 9000  # warm-up size of the clustering stages: scanpy (and our faiss backend) use exact kNN below 8,192
TABLE, SAMPLE, IMAGE = "nuclei_features", "sample", "IF"

# The performance targets, with what was measured before the work on them (2-core machine), printed beside
# this run's figures by ``_targets``. ``record``: (stage, size, field) of this suite that measures the target
# (``first_call_s`` = warm-up + timed call: what a fresh process pays), or None where another script does.
TARGETS = [
    {"target": "training throughput on 2 CPU cores, example model (conv 32, 64, 128), equal 10-epoch val loss",
     "goal": ">= 3x the earlier patches/s", "earlier": "about 1,000 patches/s (8.5-10 s per epoch of 9,557 "
     "patches on plate_3d); the library it replaces: 8.7-11.6 s per epoch",
     "record": None, "measured_by": "benchmarks/train_plate.py (plate_3d: this library against the one before the "
     "work, alternately, and the kernels' ceiling); benchmarks/train_speed.py (settings against a baseline)"},
    {"target": "real plate end to end (ingest -> embedding, 10 epochs)", "goal": "< 60 s",
     "earlier": "134-150 s (training 85-101 s, clustering + statistics 18-23 s, ingest 9-12 s)",
     "record": None, "measured_by": "examples/example_workflow.py ../shared/data/plate_3d --pixel-size 1.288 "
     "--z-step 10 --table-scale 4 --radii 25 50"},
    {"target": "phenocoder demo (Dagster, 450 objects)", "goal": "< 30 s", "earlier": "52-73 s",
     "record": ("dagster_demo", "demo", "wall_s")},
    {"target": "clustering of 12,000 objects, including what its process pays once", "goal": "< 5 s",
     "earlier": "18-23 s with the statistics; scanpy's import alone 26-30 s (umap/pynndescent numba)",
     "record": ("cluster", "plate_3d", "first_call_s")},
    {"target": "ingest at 10^6 objects", "goal": ">= 20,000 objects/s", "earlier": "296 s (3,400 objects/s)",
     "record": ("ingest", "1e6", "objects_per_s")},
    {"target": "one training epoch at 10^6 objects", "goal": "(no goal; tracked)", "earlier": "446 s",
     "record": ("train_epoch", "1e6", "wall_s")},
    {"target": "GPU path proven", "goal": "benchmarks/gpu_check.sh on a GPU machine: throughput, CPU/GPU ratio",
     "earlier": "not measured", "record": None, "measured_by": "benchmarks/gpu_check.sh"},
]


# ----------------------------------------------------------------------------------------------- plates
def _well_names(n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    rows = list(letters) + [a + b for a in letters for b in letters]
    return [f"{rows[i // 24]}{i % 24 + 1:02d}" for i in range(n)]


def _image_size(objects_per_well: int) -> int:
    step = 2 * 6.0 * math.sqrt(2.2) + 1.5  # the generator's minimum distance between nuclei
    return int(math.ceil((math.ceil(math.sqrt(objects_per_well * 1.05)) + 1) * step))


def synthetic_plate(workdir: Path, n_objects: int, objects_per_well: int, template_wells: int) -> Path:
    """A cached 2-D plate of about ``n_objects`` objects, wells hard-linked from distinct template wells."""
    from phenocoder_lib.ingest import EXPORT_COMPLETE_MARKER, PLATE_METADATA_FILE
    from phenocoder_lib.synthetic import make_synthetic_plate

    per_well = min(objects_per_well, n_objects)
    n_wells = max(1, round(n_objects / per_well))
    # copies of a well have identical patches and latents: kNN graphs of many copies are cliques of
    # duplicates and Leiden returns thousands of clusters (18,529 at 10^6 from 16 templates), so by default
    # (template_wells=0) every well is generated distinct; a positive value reuses that many templates
    n_templates = n_wells if template_wells <= 0 else min(template_wells, n_wells)
    # the cache key names the templates too: a plate of copies must never stand in for a distinct one
    plate = workdir / "plates" / f"N{n_objects}_W{per_well}_T{n_templates}"
    if (plate / EXPORT_COMPLETE_MARKER).exists():
        return plate
    template = workdir / "templates" / f"W{per_well}_T{n_templates}"
    if not (template / EXPORT_COMPLETE_MARKER).exists():
        shutil.rmtree(template, ignore_errors=True)
        t = time.perf_counter()
        make_synthetic_plate(template, n_wells=n_templates, ndim=2, image_size=_image_size(per_well),
                             nuclei_per_well=per_well, seed=1)
        _log(f"generated {n_templates} template wells of {per_well} objects in {time.perf_counter() - t:.0f} s")
    src_wells = sorted(p.stem for p in (template / "tables").glob("*.csv"))
    tmp = plate.with_name(plate.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imgs", "labels", "tables"):
        (tmp / sub).mkdir(parents=True)
    import pandas as pd

    for i, well in enumerate(_well_names(n_wells)):
        src = src_wells[i % len(src_wells)]
        for sub in ("imgs", "labels"):
            for f in (template / sub).glob(f"*_{src}_*"):
                os.link(f, tmp / sub / f.name.replace(f"_{src}_", f"_{well}_"))
        df = pd.read_csv(template / "tables" / f"{src}.csv")
        df["well"] = well
        df.to_csv(tmp / "tables" / f"{well}.csv", index=False)
    shutil.copy(template / PLATE_METADATA_FILE, tmp / PLATE_METADATA_FILE)
    (tmp / EXPORT_COMPLETE_MARKER).write_text("")
    shutil.rmtree(plate, ignore_errors=True)
    tmp.rename(plate)
    return plate


# ----------------------------------------------------------------------------------------------- stages
def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _read(plate: Path, wells=None):
    from phenocoder_lib.ingest import read_plate

    geometry = REAL_GEOMETRY if plate.resolve() == REAL.resolve() else {}
    return read_plate(plate, wells=wells, **geometry)


class Timer:
    """Wall time and CPU time of this process (all threads) inside ``with`` blocks, summed."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._t
        self.cpu += time.process_time() - self._c

    def times(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def stage_ingest(plate: Path, run: Path, opts: dict) -> dict:
    from phenocoder_lib.ingest import image_pixels, ingest_plate, ingest_worker_count, scan_plate

    out = run / "sdata"
    shutil.rmtree(out, ignore_errors=True)
    geometry = REAL_GEOMETRY if plate.resolve() == REAL.resolve() else {}
    files = scan_plate(plate)
    workers = ingest_worker_count(opts.get("ingest_workers"), len(files.wells), image_pixels(files, files.wells))
    with Timer() as timer:  # the wells in worker processes, as the Dagster `sdata` asset in a plate run
        result = ingest_plate(plate, out, workers=workers, **geometry)
    shutil.rmtree(out, ignore_errors=True)  # the next stages read the plate lazily
    times = timer.times()
    if workers > 1:  # the workers' CPU (not this process's children: the forkserver's) and their peak memory
        times["cpu_s"] += float(result["cpu_s"].sum())
    return {"n_objects": int(result["n_objects"].sum()), **times, "n_wells": len(result), "workers": workers,
            "peak_rss_mb": float(result["peak_rss_mb"].max())}


def _rss_mb() -> float | None:
    """Resident memory of this process now (Linux), in MB."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def stage_patches(plate: Path, run: Path, opts: dict) -> dict:
    # the platform's way first, in its own process (its own peak RSS, started before any import here: a child's
    # ru_maxrss starts at its parent's resident size): the Dagster `patches` asset, one well's sdata a call
    per_well = _record("patches_per_well", "", _child("patches_per_well", plate, run, opts, 3600))
    from phenocoder_lib.patches import generate_dataset

    sdata = _read(plate)
    input_rss = _rss_mb()  # imports and the caller's input (the plate's table), before generate_dataset
    with Timer() as timer:
        ds = generate_dataset(sdata, dataset="bench", dir_dataset=run / "data", table_key=TABLE,
                              sample_key=SAMPLE, image_key=IMAGE, patch_size=PATCH)
    return {"n_objects": len(ds.index), **timer.times(), "input_rss_mb": input_rss and round(input_rss, 1),
            "per_well": {k: v for k, v in per_well.items() if k not in ("stage", "size")}}


def stage_patches_per_well(plate: Path, run: Path, opts: dict) -> dict:
    """``generate_dataset`` on one well's SpatialData at a time, as the Dagster ``patches`` asset calls it."""
    import numpy as np

    from phenocoder_lib.ingest import scan_plate
    from phenocoder_lib.patches import generate_dataset

    wells = scan_plate(plate).wells
    n_all = len(wells)
    if opts.get("per_well_max_wells"):  # the peak is one well's: a seeded sample of wells bounds the stage's time
        k = int(opts["per_well_max_wells"])
        wells = sorted(np.random.default_rng(0).choice(wells, size=k, replace=False)) if n_all > k else wells
    out = run / "patches_per_well"
    n, largest, timer = 0, 0, Timer()
    for well in wells:
        sdata = _read(plate, wells=[well])  # the asset's input (the well's sdata), untimed like the plate above
        with timer:
            ds = generate_dataset(sdata, dataset=well, dir_dataset=out, table_key=TABLE, sample_key=SAMPLE,
                                  image_key=IMAGE, patch_size=PATCH)
        n, largest = n + len(ds.index), max(largest, len(ds.index))
        del ds, sdata
        shutil.rmtree(out / well)
    shutil.rmtree(out, ignore_errors=True)
    return {"n_objects": n, **timer.times(), "n_wells": len(wells), "n_wells_plate": n_all, "largest_well": largest}


def _pheno(plate: Path, run: Path, with_sdata: bool = True):
    from phenocoder_lib import Phenocoder

    return Phenocoder(sdata=_read(plate) if with_sdata else None, table_key=TABLE, sample_key=SAMPLE,
                      image_key=IMAGE, data_dir=run / "data", datasets=["bench"], seed=0)


def stage_train_epoch(plate: Path, run: Path, opts: dict) -> dict:
    import logging

    logging.getLogger("phenocoder_lib").setLevel(logging.WARNING)
    cap = opts.get("train_max_objects")
    if cap:
        _cap_split(int(cap))
    pheno = _pheno(plate, run, with_sdata=False)
    n_channels = len(pheno.open_datasets()[0].channels)
    pheno.initialize_model(16, 64, [], batch_size=128, input_shape=(PATCH, PATCH, n_channels),
                           conv_layers=(16, 32, 64), flip=True)
    with Timer() as timer:
        history = pheno.train(n_epochs=1, plot=False, verbose=0)
    split = pheno.model_config["split"]
    (run / "model_dir.txt").write_text(str(pheno.model_dir))
    n = split["n_train"] + split["n_val"]
    rec = {"n_objects": n, **timer.times(), "n_train": split["n_train"], "n_val": split["n_val"],
           "train_patches_per_s": history["train_patches_per_s"][0]}
    if cap and n < len(pheno.open_datasets()[0].index):
        rec["note"] = (f"epoch over a seeded subsample of {n} of the {len(pheno.open_datasets()[0].index)} objects "
                       "(--train-max-objects); objects_per_s is per trained object")
    return rec


def _cap_split(cap: int) -> None:
    """Make the facade's train/validation split a seeded subsample of at most ``cap`` objects (benchmark only)."""
    import numpy as np

    from phenocoder_lib import training as T

    split = T.split_train_val

    def capped(index, **kw):
        train, val = split(index, **kw)
        n = len(train) + len(val)
        if n <= cap:
            return train, val
        rng = np.random.default_rng(0)
        n_val = max(1, round(cap * len(val) / n))
        return (np.sort(rng.choice(train, cap - n_val, replace=False)), np.sort(rng.choice(val, n_val, replace=False)))

    T.split_train_val = capped


def stage_encode(plate: Path, run: Path, opts: dict) -> dict:
    pheno = _pheno(plate, run)
    pheno.load_model(Path((run / "model_dir.txt").read_text()) / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Timer() as warm:  # trace the model once, untimed in wall_s
            pheno.encode(progress=False, samples=[pheno.open_datasets()[0].samples[0]])
        with Timer() as timer:
            table = pheno.encode(progress=False)
    keep = table.obs[[SAMPLE]].copy()
    import anndata as ad
    import numpy as np

    out = ad.AnnData(np.asarray(table.X, dtype=np.float32), obs=keep)
    out.obsm["spatial"] = np.asarray(table.obsm["spatial"], dtype=np.float64)
    out.write_h5ad(run / "latents.h5ad")
    return {"n_objects": int(table.n_obs), **timer.times(), "warmup_s": warm.wall}


def _latents(run: Path, name: str = "latents.h5ad"):
    import anndata as ad

    return ad.read_h5ad(run / name)


def stage_message_passing(plate: Path, run: Path, opts: dict) -> dict:
    from phenocoder_lib.spatial.message_passing import spatial_message_passing

    a = _latents(run)
    with Timer() as warm:  # numba compile / cache load, untimed in wall_s
        spatial_message_passing(a.obsm["spatial"][:200], a.X[:200], MP_RADIUS)
    with Timer() as timer:
        spatial_message_passing(a.obsm["spatial"], a.X, MP_RADIUS, samples=a.obs[SAMPLE].to_numpy())
    return {"n_objects": a.n_obs, **timer.times(), "warmup_s": warm.wall, "radius_um": MP_RADIUS}


def stage_cluster(plate: Path, run: Path, opts: dict) -> dict:
    from phenocoder_lib.clustering import cluster_features

    a = _latents(run)
    with Timer() as warm:  # numba compile of pynndescent (used above 4,096 objects), untimed in wall_s
        cluster_features(a[: min(WARM_KNN, a.n_obs)].copy(), resolution=1.0, seed=0)
    with Timer() as timer:
        labels, _ = cluster_features(a, resolution=1.0, seed=0)
    a.obs["leiden"] = labels
    a.write_h5ad(run / "clustered.h5ad")
    return {"n_objects": a.n_obs, **timer.times(), "warmup_s": warm.wall, "n_clusters": len(labels.categories),
            "first_call_s": warm.wall + timer.wall}


def stage_cluster_scanpy(plate: Path, run: Path, opts: dict) -> dict:
    import scanpy as sc

    a = _latents(run)

    def scanpy_leiden(a):
        sc.pp.scale(a)
        sc.pp.pca(a, n_comps=min(50, a.n_vars - 1), random_state=0)
        sc.pp.neighbors(a, n_neighbors=15, random_state=0)
        sc.tl.leiden(a, resolution=1.0, flavor="igraph", n_iterations=2, random_state=0)

    with Timer() as warm:
        scanpy_leiden(a[: min(WARM_KNN, a.n_obs)].copy())
    with Timer() as timer:
        scanpy_leiden(a)
    return {"n_objects": a.n_obs, **timer.times(), "warmup_s": warm.wall, "first_call_s": warm.wall + timer.wall,
            "n_clusters": int(a.obs["leiden"].nunique()),
            "what": "scanpy scale + pca + neighbors (15) + leiden (igraph, 2 iterations)"}


def stage_spatial_stats(plate: Path, run: Path, opts: dict) -> dict:
    from phenocoder_lib.spatial.driver import compute_spatial_stats

    a = _latents(run, "clustered.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = a[a.obs[SAMPLE] == a.obs[SAMPLE].iloc[0]]
        with Timer() as warm:  # numba cache load, untimed in wall_s
            compute_spatial_stats(first[: min(300, first.n_obs)].copy(), sample_key=SAMPLE, cluster_key="leiden",
                                  radii=RADII, progress=False)
        with Timer() as timer:
            stats = compute_spatial_stats(a, sample_key=SAMPLE, cluster_key="leiden", radii=RADII, progress=False)
    stats.write_h5ad(run / "stats.h5ad")
    return {"n_objects": a.n_obs, **timer.times(), "warmup_s": warm.wall, "radii": list(RADII),
            "n_features": stats.n_vars}


def stage_spatial_stats_squidpy(plate: Path, run: Path, opts: dict) -> dict:
    from spatial_stats import squidpy_all  # benchmarks/spatial_stats.py

    a = _latents(run, "clustered.h5ad")
    timer, groups = Timer(), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        squidpy_all(a[: min(300, a.n_obs)].copy(), RADII[0], True)  # compile squidpy's numba kernels (untimed)
        for sample in a.obs[SAMPLE].unique():
            w = a[a.obs[SAMPLE] == sample].copy()
            for r in RADII:
                with timer:
                    squidpy_all(w, r, True, out=groups)
    import squidpy as sq

    return {"n_objects": a.n_obs, **timer.times(), "what": f"squidpy {sq.__version__} per well, radii "
            f"{list(RADII)}, nhood_enrichment with 1000 permutations",
            "per_function_s": {k: round(v["s"], 3) for k, v in groups.items()}}


def stage_embedding(plate: Path, run: Path, opts: dict) -> dict:
    import anndata as ad

    from phenocoder_lib.embedding import spatialgraph_embedding

    stats = ad.read_h5ad(run / "stats.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Timer() as warm:  # numba compile of umap, untimed in wall_s
            spatialgraph_embedding(stats.copy(), n_dim=min(32, stats.n_obs), seed=0)
        with Timer() as timer:
            spatialgraph_embedding(stats, n_dim=min(32, stats.n_obs), seed=0)
    n_objects = int(json.loads((run / "n_objects.json").read_text())) if (run / "n_objects.json").exists() else 0
    return {"n_objects": n_objects, "n_wells": stats.n_obs, **timer.times(), "warmup_s": warm.wall}


def stage_dagster_demo(plate: Path, run: Path, opts: dict) -> dict:
    from phenocoder_assets.cli import run_demo

    kw = dict(wells=2, epochs=1, image_size=128, nuclei_per_well=40) if opts.get("quick") else {}
    with tempfile.TemporaryDirectory(prefix="phenocoder_bench_demo_") as home:
        with Timer() as timer:
            res = run_demo(home, quiet=True, **kw)
        import pandas as pd

        objects = pd.read_csv(res.plate_dir / "ground_truth" / "objects.csv")
    return {"n_objects": len(objects), **timer.times(), "n_wells": len(res.samples),
            "what": "run_demo: writes the demo plate and materializes the whole asset graph" +
                    (" (quick: 2 wells, 1 epoch)" if opts.get("quick") else " (3 wells, 5 epochs)")}


WORKERS = {name[len("stage_"):]: fn for name, fn in globals().items() if name.startswith("stage_")}


# ----------------------------------------------------------------------------------------------- driver
def _child(stage: str, plate: Path, run: Path, opts: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, "--plate", str(plate), "--run", str(run),
           "--opts", json.dumps(opts)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not measured: timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:] or [f"rc={proc.returncode}"]
        return {"error": " | ".join(tail)}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_s"] = round(time.perf_counter() - t0, 2)
    return rec


def _record(stage: str, size: str, rec: dict) -> dict:
    out = {"stage": stage, "size": size}
    if "error" in rec:
        out["error"] = rec["error"]
        return out
    n, wall = rec.pop("n_objects"), rec.pop("wall_s")
    out.update(n_objects=int(n), wall_s=round(wall, 3), objects_per_s=round(n / wall, 1) if wall > 0 else None,
               peak_rss_mb=round(rec.pop("peak_rss_mb"), 1))
    if "cpu_s" in rec:
        out["cpu_s"] = round(rec.pop("cpu_s"), 3)
    out.update(rec)
    return out


def run_size(size: str, plate: Path, workdir: Path, args, opts: dict) -> list[dict]:
    run = workdir / "runs" / size
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    records = []
    n_objects = None
    for stage in STAGES:
        if f"{stage}@{size}" in args.skip:
            records.append({"stage": stage, "size": size, "error": "not measured: skipped (--skip)"})
            continue
        _log(f"{size}: {stage} ...")
        rec = _record(stage, size, _child(stage, plate, run, opts, args.timeout))
        if n_objects is None and "n_objects" in rec:
            n_objects = rec["n_objects"]
            (run / "n_objects.json").write_text(json.dumps(n_objects))
        base = BASELINES.get(stage)
        if base and "error" not in rec:
            if args.no_baselines:
                rec["baseline"] = {"error": "not measured: --no-baselines"}
            elif n_objects > args.baseline_max_objects:
                rec["baseline"] = {"error": f"not measured: {n_objects} objects > --baseline-max-objects "
                                            f"{args.baseline_max_objects:.0f} (too slow / too much memory here)"}
            else:
                _log(f"{size}: {base} ...")
                b = _record(base, size, _child(base, plate, run, opts, args.baseline_timeout))
                rec["baseline"] = {k: v for k, v in b.items() if k not in ("stage", "size")}
                if "wall_s" in b:
                    rec["ratio"] = round(b["wall_s"] / rec["wall_s"], 2)
        _log(f"{size}: {stage}: {rec.get('wall_s', rec.get('error'))} s, ratio {rec.get('ratio')}")
        records.append(rec)
        if args.out:  # every record as soon as it is measured, so a long run that is stopped keeps them
            with open(args.out.with_suffix(".partial.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return records


def _slope(records: list[dict], stage: str, sizes: list[str], key: str) -> dict | None:
    """log-log slope of wall time (or the growth of peak RSS) between the smallest and largest size measured."""
    pts = {r["size"]: r for r in records if r["stage"] == stage and "wall_s" in r}
    have = [s for s in sizes if s in pts]
    if len(have) < 2:
        return None
    a, b = pts[have[0]], pts[have[-1]]
    if key == "wall_s":
        def slope(p, q):
            return round(math.log(q["wall_s"] / p["wall_s"]) / math.log(q["n_objects"] / p["n_objects"]), 3)

        steps = {f"{x}->{y}": slope(pts[x], pts[y]) for x, y in zip(have, have[1:], strict=False)}
        out = {"slope": slope(a, b), "from": have[0], "to": have[-1], "wall_s": [a["wall_s"], b["wall_s"]],
               "steps": steps}
        if a.get("cpu_s") and b.get("cpu_s"):  # CPU time: robust to other work sharing the machine
            out["cpu_slope"] = round(math.log(b["cpu_s"] / a["cpu_s"]) / math.log(b["n_objects"] / a["n_objects"]), 3)
        return out
    return {"from": have[0], "to": have[-1], "peak_rss_mb": [a["peak_rss_mb"], b["peak_rss_mb"]],
            "growth": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2),
            "n_growth": round(b["n_objects"] / a["n_objects"], 1)}


def _targets(records: list[dict]) -> list[dict]:
    """Every target with its goal, the earlier measurement and this run's figure where the suite measured it."""
    out = []
    for t in TARGETS:
        row = {k: v for k, v in t.items() if k != "record"}
        if t["record"] is not None:
            stage, size, key = t["record"]
            rec = next((r for r in records if r["stage"] == stage and r["size"] == size), None)
            row["now"] = (rec.get(key) if rec and key in rec else
                          rec.get("error") if rec else f"not measured in this run ({stage} at {size})")
            row["now_field"] = f"{stage}@{size}.{key}"
            if rec and "baseline" in rec and key in rec["baseline"]:
                row["baseline_now"] = rec["baseline"][key]
        out.append(row)
    return out


def _machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("numpy", "numba", "tensorflow-cpu", "tensorflow", "keras", "scanpy", "squidpy", "anndata",
                "spatialdata", "dagster", "igraph"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_start": [round(x, 2) for x in os.getloadavg()], "versions": versions}


def _parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s.strip()]


def _size_name(n: int) -> str:
    e = int(math.log10(n))
    return f"1e{e}" if 10**e == n else str(n)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="synthetic plate sizes in objects (comma separated)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (400 and 1600 objects)")
    ap.add_argument("--no-baselines", action="store_true", help="skip squidpy and scanpy")
    ap.add_argument("--baseline-max-objects", type=float, default=1e5, help="largest size with baselines")
    ap.add_argument("--plate", default=None, help="real plate folder (default: ../shared/data/plate_3d if "
                                                  "present; 'none' to skip)")
    ap.add_argument("--no-dagster", action="store_true", help="skip the Dagster demo materialization")
    ap.add_argument("--objects-per-well", type=int, default=5000)
    ap.add_argument("--template-wells", type=int, default=0,
                    help="distinct generated wells per plate (0, the default: every well distinct; a positive "
                         "number reuses that many, faster to generate but copies distort the clustering)")
    ap.add_argument("--train-max-objects", type=float, default=None,
                    help="train the epoch on a seeded subsample of at most this many objects (stated in the record)")
    ap.add_argument("--ingest-workers", type=int, default=None,
                    help="worker processes of the ingest stage (default: one per core where that pays)")
    ap.add_argument("--per-well-max-wells", type=int, default=20,
                    help="per-well patch extraction (patches.per_well) on a seeded sample of at most this many "
                         "wells (0: every well)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    ap.add_argument("--baseline-timeout", type=float, default=900, help="seconds per baseline")
    ap.add_argument("--workdir", type=Path, default=None, help="cache of plates and stage outputs "
                                                               "(default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the stage outputs in the workdir")
    ap.add_argument("--skip", default="", help="stages not to measure, as STAGE@SIZE,... (e.g. ingest@1e6)")
    ap.add_argument("--include", type=Path, action="append", default=[],
                    help="JSON document of an earlier run (repeatable): its records of the sizes that this run "
                         "does not measure are merged (sizes[...].run says which run measured them)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON document here (and each record, "
                                                          "as it is measured, to OUT.partial.jsonl)")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--opts", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        warnings.filterwarnings("ignore")
        plate = Path(args.plate)
        opts = json.loads(args.opts)
        rec = WORKERS[args.worker](plate, args.run, opts)
        # the stage's own peak, or its worker processes' where it has some and they went higher
        rec["peak_rss_mb"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rec.get("peak_rss_mb") or 0)
        print(json.dumps(rec))
        return rec

    if args.quick:
        args.sizes, args.objects_per_well, args.template_wells = "400,1600", 200, 4
    sizes = sorted(_parse_sizes(args.sizes))
    opts = {"quick": args.quick, "train_max_objects": args.train_max_objects,
            "per_well_max_wells": args.per_well_max_wells, "ingest_workers": args.ingest_workers}
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="phenocoder_bench_")
        args.workdir = Path(tmp.name)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    real = None if args.plate == "none" else Path(args.plate) if args.plate else REAL if (REAL / "imgs").is_dir() \
        else None
    if args.quick and args.plate is None:
        real = None

    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"benchmark": "phenocoder suite", "machine": _machine(), "sizes": {}, "stages": []}
    requested = {_size_name(n) for n in sizes} | ({"plate_3d"} if real is not None else set())
    for i, path in enumerate(args.include):
        earlier = json.loads(path.read_text())
        report.setdefault("earlier_runs", []).append({"file": str(path), "machine": earlier["machine"],
                                                      "suite_s": earlier.get("suite_s")})
        # this run's sizes win, then the first --include that has the size
        keep = {name for name in earlier["sizes"] if name not in requested and name not in report["sizes"]}
        for name in keep:
            report["sizes"][name] = {**earlier["sizes"][name], "run": f"earlier_runs[{i}]"}
        if args.no_dagster and not any(r["size"] == "demo" for r in report["stages"]):
            keep.add("demo")
        report["stages"] += [r for r in earlier["stages"] if r["size"] in keep]
    t_suite = time.perf_counter()
    for n in sizes:
        name = _size_name(n)
        if name in report["sizes"]:
            continue
        t = time.perf_counter()
        plate = synthetic_plate(workdir, n, args.objects_per_well, args.template_wells)
        report["sizes"][name] = {"plate": str(plate), "kind": "synthetic 2-D, 4 channels, uint8",
                                 "objects_per_well": min(args.objects_per_well, n),
                                 "n_wells": len(list((plate / "tables").glob("*.csv"))),
                                 "plate_ready_s": round(time.perf_counter() - t, 1)}
        report["stages"] += run_size(name, plate, workdir, args, opts)
    if real is not None and "plate_3d" not in report["sizes"]:
        report["sizes"]["plate_3d"] = {"plate": str(real.resolve()), "kind": "real 3-D plate", **REAL_GEOMETRY}
        report["stages"] += run_size("plate_3d", real, workdir, args, opts)
    if not args.no_dagster:
        _log("dagster_demo ...")
        report["stages"].append(_record("dagster_demo", "demo", _child("dagster_demo", workdir, workdir, opts,
                                                                       args.timeout)))
    synthetic = [k for k, v in report["sizes"].items() if v["kind"].startswith("synthetic")]
    names = sorted(synthetic, key=lambda k: float(k))
    report["scaling"] = {s: _slope(report["stages"], s, names, "wall_s") for s in STAGES}
    report["memory"] = {s: _slope(report["stages"], s, names, "peak_rss_mb") for s in STAGES}
    report["targets"] = _targets(report["stages"])
    report["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["suite_s"] = round(time.perf_counter() - t_suite, 1)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()
