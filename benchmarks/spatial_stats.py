"""Benchmark: spatial graph statistics (all six groups) against squidpy's functions, one JSON document.

Synthetic 3-D data as in ``shared/notes/spatial-performance.md``: ``n`` points uniform in a cube of side
``(1000 n)^(1/3)`` (about one object per 1000 unit^3), 8 equiprobable clusters, 20 float32 features
(5 with a smooth spatial trend). Sizes 1e4 and 1e5 with radii (25, 50); ``--full`` adds 1e6 with
radius 25. Each measurement runs in a fresh subprocess (so peak RSS is per run) after a JIT warm-up
on a small sample. squidpy runs on the sizes where it is feasible on a 2-core / 24 GB machine
(centrality only on small graphs: networkx is ~10 min per 1e6 edges).

    python benchmarks/spatial_stats.py            # 1e4, 1e5
    python benchmarks/spatial_stats.py --full     # + 1e6 (r=25) and squidpy centrality at 1e5, r=25

Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
N_CLUSTERS = 8
N_FEATURES = 20
GROUPS = ("interactions", "centrality", "connectivity", "moran_features", "moran_clusters", "chull")


def make_data(n: int, seed: int = 0):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    side = (1000.0 * n) ** (1 / 3)
    coords = rng.uniform(0, side, (n, 3))
    x = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    x[:, :5] += np.sin(coords[:, :1] / side * np.pi * np.arange(1, 6)).astype(np.float32)
    obs = pd.DataFrame({"sample": pd.Categorical(["w"] * n),
                        "leiden": pd.Categorical(rng.integers(0, N_CLUSTERS, n).astype(str),
                                                 categories=[str(c) for c in range(N_CLUSTERS)])},
                       index=pd.RangeIndex(n).astype(str))
    adata = ad.AnnData(X=x, obs=obs)
    adata.var_names = [f"f{i}" for i in range(N_FEATURES)]
    adata.obsm["spatial"] = coords
    return adata


class PeakRSS:
    """Peak resident memory of this process while inside ``section`` (5 ms polling)."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def reset(self):
        self._peak = self._proc.memory_info().rss

    def peak(self):
        self._peak = max(self._peak, self._proc.memory_info().rss)
        return self._peak

    def close(self):
        self._stop.set()


def _gb(b: float) -> float:
    return round(b / 2**30, 3)


def worker_ours(n: int, radii: list[float]) -> dict:
    import warnings

    from phenocoder_lib.spatial.driver import compute_spatial_stats
    from phenocoder_lib.spatial.stats import StatsConfig, compute_stats

    warm = make_data(3000, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n_samples in (1000, 50):  # exact and sampled clustering kernels
            compute_spatial_stats(warm, sample_key="sample", radii=radii, progress=False,
                                  n_clustering_samples=n_samples)
    adata = make_data(n)
    rss = PeakRSS()
    groups: dict[str, dict[str, float]] = {}
    per_radius: dict[str, dict[str, float]] = {}

    @contextmanager
    def section(name, radius):
        rss.reset()
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        g = groups.setdefault(name, {"s": 0.0, "peak_rss_gb": 0.0})
        g["s"] += dt
        g["peak_rss_gb"] = max(g["peak_rss_gb"], _gb(rss.peak()))
        if radius is not None:
            per_radius.setdefault(str(float(radius)), {})[name] = round(dt, 4)

    # per-group profile of one sample (the same computation as the driver's)
    config = StatsConfig(radii=tuple(float(r) for r in radii), stats=GROUPS,
                         categories=tuple(str(c) for c in range(N_CLUSTERS)),
                         var_names=tuple(adata.var_names))
    codes = adata.obs["leiden"].cat.codes.to_numpy().astype(np.int32)
    values = np.asarray(adata.X, dtype=np.float64)
    compute_stats(adata.obsm["spatial"], codes, config, values=values, seed_key=(1,), profile=section)
    # end to end through the table driver (default settings), in the same process
    rss.reset()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = compute_spatial_stats(adata, sample_key="sample", radii=radii, progress=False)
    total = time.perf_counter() - t0
    peak = rss.peak()
    rss.close()
    from phenocoder_lib.spatial.graph import build_radius_graph

    g = build_radius_graph(adata.obsm["spatial"], radii)
    mean_deg = {str(float(r)): round(float(g.view(r).degree.mean()), 1) for r in radii}
    return {"total_s": round(total, 3), "peak_rss_gb": _gb(peak), "n_features": int(res.n_vars),
            "groups": {k: {"s": round(v["s"], 4), "peak_rss_gb": v["peak_rss_gb"]} for k, v in groups.items()},
            "groups_per_radius_s": per_radius, "mean_degree": mean_deg}


def squidpy_all(a, radius, do_centrality, rss=None, out=None):
    """squidpy's functions for every comparable group on ``a`` (clusters in ``obs['leiden']``) at one radius."""
    import anndata as ad
    import pandas as pd
    import squidpy as sq

    def timed(name, fn):
        if rss is not None:
            rss.reset()
        t0 = time.perf_counter()
        val = fn()
        if out is not None:
            rec = out.setdefault(name, {"s": 0.0, "peak_rss_gb": 0.0})
            rec["s"] += time.perf_counter() - t0
            if rss is not None:
                rec["peak_rss_gb"] = max(rec["peak_rss_gb"], _gb(rss.peak()))
        return val

    timed("spatial_neighbors", lambda: sq.gr.spatial_neighbors(a, coord_type="generic", radius=float(radius),
                                                               delaunay=False))
    timed("interaction_matrix", lambda: (sq.gr.interaction_matrix(a, "leiden", copy=True),
                                         sq.gr.interaction_matrix(a, "leiden", normalized=True, copy=True)))
    timed("nhood_enrichment", lambda: sq.gr.nhood_enrichment(a, "leiden", copy=True, seed=0,
                                                             show_progress_bar=False))
    if do_centrality:
        timed("centrality_scores", lambda: sq.gr.centrality_scores(a, "leiden", copy=True,
                                                                   show_progress_bar=False))
    timed("spatial_autocorr_features", lambda: sq.gr.spatial_autocorr(a, mode="moran", n_perms=None,
                                                                      genes=list(a.var_names), copy=True))
    onehot = ad.AnnData(pd.get_dummies(a.obs["leiden"]).astype(float).to_numpy(), obs=a.obs)
    onehot.var_names = [str(c) for c in a.obs["leiden"].cat.categories]
    onehot.obsp["spatial_connectivities"] = a.obsp["spatial_connectivities"]
    timed("spatial_autocorr_clusters", lambda: sq.gr.spatial_autocorr(onehot, mode="moran", n_perms=None,
                                                                      genes=list(onehot.var_names), copy=True))


def worker_squidpy(n: int, radii: list[float], centrality_max_edges: float) -> dict:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("spatialdata").setLevel(logging.WARNING)
    import squidpy as sq

    warm = make_data(2000, seed=1)
    squidpy_all(warm, 25, True)
    adata = make_data(n)
    rss = PeakRSS()
    per_radius = {}
    for r in radii:
        expected_edges = n * 4 / 3 * np.pi * r**3 / 1000.0
        out: dict = {}
        squidpy_all(adata, r, expected_edges <= centrality_max_edges, rss, out)
        per_radius[str(r)] = {k: {"s": round(v["s"], 3), "peak_rss_gb": v["peak_rss_gb"]} for k, v in out.items()}
    rss.close()
    return {"per_radius": per_radius, "version": sq.__version__}


def _run_worker(kind: str, n: int, radii: list[float], extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--n", str(n), "--radii", *map(str, radii), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"[bench] {kind} n={n} radii={radii} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    print(f"[bench]   done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc={proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratios(ours: dict, theirs: dict) -> dict:
    """squidpy time / our time per comparable group and radius.

    Our shared per-radius edge pass is charged to every group that uses it, and the one-off
    preparation of the Moran variables to every radius: the ratios are conservative.
    """
    if "error" in ours or "error" in theirs:
        return {}
    out: dict = {}
    entry = lambda a, b: {"ours_s": round(a, 4), "squidpy_s": round(b, 3),  # noqa: E731
                          "speedup": round(b / a, 1) if a > 0 else None}
    sq_graph = sum(v["spatial_neighbors"]["s"] for v in theirs["per_radius"].values())
    out["graph (all radii)"] = entry(ours["groups"]["graph"]["s"], sq_graph)
    ours_sum, sq_sum = ours["groups"]["graph"]["s"], sq_graph
    prep = ours["groups"]["moran_features"]["s"] - sum(v.get("moran_features", 0.0)
                                                       for v in ours["groups_per_radius_s"].values())
    for r, sq in theirs["per_radius"].items():
        g = ours["groups_per_radius_s"][r]
        edge = g["edge_pass"]
        pairs = {
            "interactions (+enrichment)": (g["interactions"] + edge,
                                           sq["interaction_matrix"]["s"] + sq["nhood_enrichment"]["s"]),
            "moran_features": (g["moran_features"] + prep, sq["spatial_autocorr_features"]["s"]),
            "moran_clusters": (g["moran_clusters"] + edge, sq["spatial_autocorr_clusters"]["s"]),
        }
        if "centrality_scores" in sq:
            pairs["centrality"] = (g["centrality"] + edge, sq["centrality_scores"]["s"])
        out[f"r={r}"] = {k: entry(a, b) for k, (a, b) in pairs.items()}
        ours_sum += sum(a for a, _ in pairs.values()) - edge * (len(pairs) - 1)
        sq_sum += sum(b for _, b in pairs.values())
    out["all comparable groups"] = entry(ours_sum, sq_sum)
    return out


def _min_speedup(ratios: dict) -> float:
    vals = [v["speedup"] for k, v in ratios.items() if k.startswith("graph")]
    vals += [x["speedup"] for k, v in ratios.items() if k.startswith("r=") for x in v.values()]
    return min(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="add 1e6 objects (radius 25) and more squidpy centrality")
    ap.add_argument("--no-squidpy", action="store_true", help="only our implementation")
    ap.add_argument("--worker", choices=["ours", "squidpy"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--radii", type=float, nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--centrality-max-edges", type=float, default=1e6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "ours":
        print(json.dumps(worker_ours(args.n, args.radii)))
        return
    if args.worker == "squidpy":
        print(json.dumps(worker_squidpy(args.n, args.radii, args.centrality_max_edges)))
        return

    import numba

    sizes = [(10_000, [25, 50]), (100_000, [25, 50])]
    if args.full:
        sizes.append((1_000_000, [25]))
    cmax = ["--centrality-max-edges", str(7e6 if args.full else 1e6)]
    machine = {"cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
               "python": platform.python_version(), "platform": platform.platform()}
    report = {"benchmark": "spatial_stats", "machine": machine,
              "data": {"density": "1 object per 1000 unit^3, uniform cube", "clusters": N_CLUSTERS,
                       "features": N_FEATURES, "groups": list(GROUPS), "defaults": "exact=False, "
                       "n_clustering_samples=1000, chull_min_nds=10, chull_min_degree=3"},
              "results": []}
    for n, radii in sizes:
        entry = {"n": n, "radii": radii, "ours": _run_worker("ours", n, radii, [], timeout=1800)}
        feasible_sq = n <= 100_000 and not args.no_squidpy
        if feasible_sq:
            entry["squidpy"] = _run_worker("squidpy", n, radii, cmax, timeout=3600)
            entry["speedup_vs_squidpy"] = _ratios(entry["ours"], entry["squidpy"])
        else:
            entry["squidpy"] = {"skipped": "not feasible (spatial_neighbors ~1 min and >7 GB, centrality ~30 min, "
                                           "1000-permutation enrichment ~5 min at 1e6)" if n > 100_000 else
                                "disabled (--no-squidpy)"}
        report["results"].append(entry)
    goals = {}
    for e in report["results"]:
        o = e["ours"]
        if "error" in o:
            continue
        if e["n"] == 100_000:
            goals["1e5 radii (25, 50) under 20 s"] = {"s": o["total_s"], "met": o["total_s"] < 20}
        if e["n"] == 1_000_000:
            goals["1e6 radius 25 under 180 s and 8 GB"] = {"s": o["total_s"], "peak_rss_gb": o["peak_rss_gb"],
                                                           "met": o["total_s"] < 180 and o["peak_rss_gb"] < 8}
        sp = e.get("speedup_vs_squidpy", {})
        if sp:
            slowest = _min_speedup(sp)
            goals[f"{e['n']:.0e}: >= 10x squidpy, no group slower"] = {
                "speedup_all": sp["all comparable groups"]["speedup"], "slowest_group_speedup": slowest,
                "met": sp["all comparable groups"]["speedup"] >= 10 and slowest >= 1}
    report["goals"] = goals
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
