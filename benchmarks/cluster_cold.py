"""Clustering in a fresh process, imports included: ``cluster_features`` against scanpy's path (JSON).

Usage::

    python benchmarks/cluster_cold.py                 # 12,000 objects, 16 features, 2 rounds
    python benchmarks/cluster_cold.py --n 50000 --rounds 3

Each measurement is a new Python process that times everything from its first import to the labels (what
a Dagster step or a CLI call pays once): ``ours`` runs :func:`phenocoder_lib.clustering.cluster_features`
(standardise, PCA, kNN graph, connectivities, Leiden; no scanpy); ``scanpy`` runs the same standardise and
PCA and then scanpy's ``pp.neighbors`` (with our faiss kNN above 8,192 objects, as the library did) and
``tl.leiden(flavor='igraph')``, importing scanpy, umap and numba. The two alternate, round after round, so
a shared machine's load hits both alike; ``labels_equal`` says whether both gave the same labels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_DATA = ("import numpy as np; r = np.random.default_rng({seed}); c = r.normal(scale=6, size=(10, {d}));"
         "x = (c[r.integers(0, 10, {n})] + r.normal(size=({n}, {d}))).astype('float32');")

_OURS = """
import time; t0 = time.perf_counter()
import anndata as ad, hashlib, numpy as np
from phenocoder_lib.clustering import cluster_features
labels, ref = cluster_features(ad.AnnData(x), resolution=1.0, seed=0)
import sys
digest = hashlib.sha1(np.asarray(labels).astype(str).astype('U').tobytes()).hexdigest()
heavy = any(m in sys.modules for m in ('scanpy', 'umap', 'numba'))
print(time.perf_counter() - t0, len(labels.categories), digest, heavy)
"""

_SCANPY = """
import time; t0 = time.perf_counter()
import anndata as ad, hashlib, numpy as np
from sklearn.decomposition import PCA
from phenocoder_lib._lazy import import_scanpy
from phenocoder_lib.clustering import FaissKNNTransformer
sc = import_scanpy()
xs = x.astype(np.float64); m = xs.mean(0); s = xs.std(0); s[~(s > 0)] = 1; xs = (xs - m) / s
k = min(50, xs.shape[0] - 1, xs.shape[1])
solver = 'full' if min(xs.shape) <= 1000 else 'randomized'
emb = PCA(n_components=k, svd_solver=solver, random_state=0).fit_transform(xs).astype(np.float32)
a = ad.AnnData(np.zeros((x.shape[0], 0), np.float32)); a.obsm['X_pca'] = emb
tr = FaissKNNTransformer(n_neighbors=15) if x.shape[0] >= 8192 else None
sc.pp.neighbors(a, n_neighbors=15, use_rep='X_pca', random_state=0, transformer=tr)
sc.tl.leiden(a, resolution=1.0, flavor='igraph', n_iterations=2, directed=False, random_state=0)
lab = a.obs['leiden'].astype(str).to_numpy()
cats = sorted(set(lab), key=lambda v: (len(v), v))
print(time.perf_counter() - t0, len(cats), hashlib.sha1(lab.astype('U').tobytes()).hexdigest(), True)
"""


def _run(code: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    process_s = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    seconds, n_clusters, digest, heavy = proc.stdout.strip().splitlines()[-1].split()
    return {"seconds": round(float(seconds), 2), "process_s": round(process_s, 2), "n_clusters": int(n_clusters),
            "digest": digest, "imports_scanpy_umap_numba": heavy == "True"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12_000)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = _DATA.format(seed=args.seed, n=args.n, d=args.d)
    runs: dict[str, list[dict]] = {"ours": [], "scanpy": []}
    for _ in range(args.rounds):
        runs["ours"].append(_run(data + _OURS))
        runs["scanpy"].append(_run(data + _SCANPY))
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    result = {"n_objects": args.n, "n_features": args.d, "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
              "load_avg_end": os.getloadavg(), "goal_seconds": 5.0,
              "earlier": "scanpy's import alone 26-30 s; clustering + statistics of the real plate 18-23 s",
              "ours": runs["ours"], "scanpy": runs["scanpy"], "median_seconds": med,
              "speedup_vs_scanpy": round(med["scanpy"] / med["ours"], 2),
              "labels_equal": runs["ours"][0]["digest"] == runs["scanpy"][0]["digest"]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
