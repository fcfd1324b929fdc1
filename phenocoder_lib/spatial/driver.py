"""Spatial graph statistics over every sample (or every subunit) of a table, as one AnnData.

Result layout (``pheno.adata`` after ``spatialgraph_stats``):

- sample level: ``obs_names`` are the sample ids as ``str`` and ``obs.index.name`` is the sample key;
- subunit level: ``obs_names`` are ``'0'..'m-1'`` and ``obs`` has ``<sample_key>``, ``subunit_id``
  (int), ``subunit_key`` (str of the grid tuple), ``subunit_n_obs`` (objects used) and
  ``subunit_n_total`` (objects in the cube before subsampling);
- both: ``obs['status']`` (``'ok'``/``'skipped'``), ``obs['skipped_reason']``, ``obs['n_obs']``,
  ``obs['n_unlabelled']`` and the standard errors of sampled clustering coefficients;
  ``.X`` float64 features, NaN where undefined (see ``docs/spatial_statistics.md``); ``var['radius']``
  and ``var['group']``; ``uns['spatialgraph_stats']`` with the settings (JSON-compatible).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..validation import check_categorical, check_obs_column, check_obsm, require
from ..warnings import SpatialStatsWarning
from .stats import (
    DEFAULT_CLUSTERING_SAMPLES,
    STATUS_OK,
    STATUS_SKIPPED,
    StatsConfig,
    compute_stats,
    normalize_radii,
    normalize_stats,
    se_column,
    stable_key,
    table_values,
    validate_hull_params,
)
from .subunits import normalize_dim_subunit, partition_subunits

logger = logging.getLogger(__name__)

STATS_UNS_KEY = "spatialgraph_stats"


def sample_order(values: pd.Series) -> list[Any]:
    """Return the samples in a deterministic order: categories for a categorical column, else sorted."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return list(values.cat.categories)
    uniq = pd.unique(values)
    try:
        return sorted(uniq.tolist())
    except TypeError:  # mixed types: sort by their text
        return sorted(uniq.tolist(), key=str)


#: Default upper bound on the number of clusters (see ``max_clusters``).
DEFAULT_MAX_CLUSTERS = 500


def check_max_clusters(n_clusters: int, max_clusters: int, *, cluster_key: str, n_radii: int,
                       n_samples: int) -> None:
    """Refuse a cluster column with more than ``max_clusters`` categories (``k x k`` columns per radius)."""
    require(isinstance(max_clusters, (int, np.integer)) and not isinstance(max_clusters, bool) and max_clusters >= 1,
            f"max_clusters={max_clusters!r} must be an int >= 1.")
    if n_clusters > max_clusters:
        n_features = n_clusters**2 * n_radii
        raise ValueError(
            f"cluster_key={cluster_key!r} has {n_clusters} categories, more than max_clusters={max_clusters}: "
            f"the interaction statistics alone would hold {n_features:,} columns per sample "
            f"(~{n_features * 8 * max(1, n_samples) / 1e9:.1f} GB for {n_samples} samples). Cluster at a lower "
            "resolution (e.g. cluster(resolution=0.2)), or pass a larger max_clusters if this is intended.")


def compute_spatial_stats(
    table,
    *,
    sample_key: str,
    cluster_key: str = "leiden",
    spatial_key: str = "spatial",
    radii: float | Sequence[float] = (25, 50),
    stats: str | Iterable[str] | None = None,
    layer: str | None = None,
    chull_min_nds: int = 10,
    chull_min_degree: int = 3,
    exact: bool = False,
    n_clustering_samples: int = DEFAULT_CLUSTERING_SAMPLES,
    use_subunits: bool = False,
    dim_subunit: float | Sequence[float] = (500, 500, 100),
    min_obs_per_subunit: int = 100,
    max_obs_per_subunit: int | None = None,
    subunit_origin: Sequence[float] | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    progress: bool = True,
    table_key: str | None = None,
    max_clusters: int = DEFAULT_MAX_CLUSTERS,
):
    """Spatial graph statistics of every sample (or subunit) of ``table``.

    Parameters
    ----------
    table
        AnnData of objects: ``.obs[sample_key]``, a categorical ``.obs[cluster_key]``, coordinates
        ``.obsm[spatial_key]`` (``(y, x)`` or ``(y, x, z)``, one unit on every axis), and for
        ``moran_features`` the variables in ``.X`` (or ``.layers[layer]``). Not modified.
    sample_key
        ``.obs`` column naming the sample (well). Objects with a missing sample raise.
    spatial_key
        ``.obsm`` key of the coordinates.
    cluster_key
        Categorical ``.obs`` column; its categories (all of them, used or not) fix the columns, so
        every sample gets the same columns. Objects with a missing label are left out (counted in
        ``obs['n_unlabelled']``).
    radii, stats, layer, chull_min_nds, chull_min_degree, exact, n_clustering_samples
        See :func:`~phenocoder_lib.spatial.stats.sample_spatial_stats`.
    use_subunits, dim_subunit, min_obs_per_subunit, max_obs_per_subunit, subunit_origin
        Compute per cube of edge ``dim_subunit`` on a grid anchored at ``subunit_origin`` (default:
        the coordinate origin, shared by all samples); cubes with fewer than
        ``min_obs_per_subunit`` objects are dropped (counted in ``uns``), larger ones are subsampled
        to ``max_obs_per_subunit`` (seeded).
    seed
        Seed for node samples and subsampling.
    n_jobs
        ``1``: samples one after the other, numba threads inside each. ``> 1``: that many worker
        processes, one sample at a time each (single-threaded); best for many small wells.
    progress
        Show a progress bar.
    table_key
        Recorded in ``uns`` only (where the table came from).
    max_clusters
        Refuse more categories than this in ``cluster_key``: the interaction and centrality groups keep
        ``k x k`` and ``k`` columns per radius for every sample, so a clustering at a far too fine resolution
        (thousands of clusters) would need gigabytes per well. Raise it deliberately if you need more.

    Returns
    -------
    anndata.AnnData
        See the module docstring. Skipped samples/subunits are rows with ``status='skipped'``,
        NaN features and a reason; they are also named in a :class:`SpatialStatsWarning`.

    Raises
    ------
    ValueError
        When nothing could be computed (every sample/subunit skipped), or for invalid arguments.

    """
    import anndata as ad

    check_obs_column(table.obs, sample_key, argument="sample_key")
    cats = check_categorical(table.obs, cluster_key, argument="cluster_key")
    coords = check_obsm(table, spatial_key, argument="spatial_key", n_cols=(2, 3))
    stats_t = normalize_stats(stats)
    radii_t = normalize_radii(radii)
    validate_hull_params(chull_min_nds, chull_min_degree, coords.shape[1])
    require(int(n_clustering_samples) >= 2,
            f"n_clustering_samples={n_clustering_samples!r} must be >= 2 (the standard error needs 2).")
    require(isinstance(n_jobs, (int, np.integer)) and n_jobs >= 1, f"n_jobs={n_jobs!r} must be an int >= 1.")
    samples_col = table.obs[sample_key]
    if samples_col.isna().any():
        raise ValueError(f"sample_key={sample_key!r}: {int(samples_col.isna().sum())} objects have no sample "
                         "(NaN); fill or drop them first.")
    if use_subunits:
        dims = normalize_dim_subunit(dim_subunit, coords.shape[1])
        require(int(min_obs_per_subunit) >= 1, f"min_obs_per_subunit={min_obs_per_subunit!r} must be >= 1.")
    categories = list(cats.categories)
    samples = sample_order(samples_col)
    check_max_clusters(len(categories), max_clusters, cluster_key=cluster_key, n_radii=len(radii_t),
                       n_samples=len(samples))
    values = table_values(table, layer) if "moran_features" in stats_t else None
    var_names = tuple(str(v) for v in table.var_names) if "moran_features" in stats_t else ()
    config = StatsConfig(radii=radii_t, stats=stats_t, categories=tuple(str(c) for c in categories),
                         var_names=var_names, chull_min_nds=int(chull_min_nds),
                         chull_min_degree=int(chull_min_degree), exact=bool(exact),
                         n_clustering_samples=int(n_clustering_samples), seed=int(seed))
    codes = np.asarray(cats.codes, dtype=np.int32)

    # rows of each sample, without a boolean scan per sample
    sample_codes = pd.Index(samples).get_indexer(samples_col.to_numpy())
    by_sample = np.argsort(sample_codes, kind="stable")
    bounds = np.searchsorted(sample_codes[by_sample], np.arange(len(samples) + 1))

    items: list[dict[str, Any]] = []  # work items: rows + metadata
    filtered: dict[str, int] = {}
    for s_idx, sample in enumerate(samples):
        rows = by_sample[bounds[s_idx]:bounds[s_idx + 1]]
        name = str(sample)
        if not use_subunits:
            items.append({"name": name, "rows": rows, "seed_key": (stable_key(name),), "meta": {}})
            continue
        subs, n_filtered = partition_subunits(coords[rows], dims, origin=subunit_origin,
                                              min_obs=int(min_obs_per_subunit), max_obs=max_obs_per_subunit,
                                              seed=int(seed), seed_key=(stable_key(name),))
        filtered[name] = int(n_filtered)
        if not subs:
            reason = ("no objects" if rows.size == 0 else
                      f"no subunit with >= {int(min_obs_per_subunit)} objects ({n_filtered} smaller cubes)")
            items.append({"name": f"{name}", "rows": None, "seed_key": (), "skip": reason,
                          "meta": {sample_key: name, "subunit_id": -1, "subunit_key": "",
                                   "subunit_n_obs": 0, "subunit_n_total": int(rows.size)}})
            continue
        for sub in subs:
            items.append({"name": f"{name} {sub.key_str}", "rows": rows[sub.rows],
                          "seed_key": (stable_key(name), stable_key(sub.key_str)),
                          "meta": {sample_key: name, "subunit_id": int(sub.id), "subunit_key": sub.key_str,
                                   "subunit_n_obs": int(sub.rows.shape[0]), "subunit_n_total": sub.n_total}})

    results = _run_items(items, coords, codes, values, config, n_jobs=int(n_jobs), progress=progress)

    n_feat = len(config.feature_names)
    x = np.full((len(items), n_feat), np.nan, dtype=np.float64)
    se_cols = [se_column(r, c) for r in radii_t for c in config.categories] if "centrality" in stats_t else []
    obs_rows = []
    for i, (item, (features, info)) in enumerate(zip(items, results, strict=True)):
        x[i] = features
        rec = dict(item["meta"])
        rec.update({"status": info["status"], "skipped_reason": info["skipped_reason"],
                    "n_obs": int(info["n_obs"]), "n_unlabelled": int(info["n_unlabelled"])})
        for col in se_cols:
            rec[col] = float(info.get(col, np.nan))
        obs_rows.append(rec)
    obs = pd.DataFrame(obs_rows)
    if use_subunits:
        obs.index = pd.Index([str(i) for i in range(len(items))])
        for col in ("subunit_id", "subunit_n_obs", "subunit_n_total"):
            obs[col] = obs[col].astype(np.int64)
    else:
        obs.index = pd.Index([item["name"] for item in items], name=sample_key)
    obs["status"] = pd.Categorical(obs["status"], categories=[STATUS_OK, STATUS_SKIPPED])

    skipped = [(item["name"], info["skipped_reason"]) for item, (_, info) in zip(items, results, strict=True)
               if info["status"] != STATUS_OK]
    level = "subunits" if use_subunits else "samples"
    if len(skipped) == len(items):
        preview = "; ".join(f"{n!r}: {r}" for n, r in skipped[:10])
        raise ValueError(f"no spatial statistics could be computed: all {len(items)} {level} were skipped "
                         f"({preview}{' ...' if len(skipped) > 10 else ''}). Check cluster_key={cluster_key!r} "
                         f"(at least two clusters per {level[:-1]}) and the subunit settings.")
    if skipped:
        preview = "; ".join(f"{n!r}: {r}" for n, r in skipped[:20])
        warnings.warn(f"{len(skipped)} of {len(items)} {level} skipped (NaN rows with obs['status'] == "
                      f"'skipped'): {preview}{' ...' if len(skipped) > 20 else ''}",
                      SpatialStatsWarning, stacklevel=2)

    var = pd.DataFrame(index=pd.Index(list(config.feature_names)))
    var["radius"] = [float(n.split("_stat:", 1)[0][len("radius:"):]) for n in var.index]
    var["group"] = [_group_of(g) for g in var.index]
    uns = {STATS_UNS_KEY: {
        "table_key": "" if table_key is None else str(table_key), "sample_key": sample_key,
        "cluster_key": cluster_key, "spatial_key": spatial_key, "radii": list(radii_t),
        "stats": list(stats_t), "categories": list(config.categories), "layer": "" if layer is None else layer,
        "chull_min_nds": int(chull_min_nds), "chull_min_degree": int(chull_min_degree), "exact": bool(exact),
        "n_clustering_samples": int(n_clustering_samples), "seed": int(seed), "use_subunits": bool(use_subunits),
        "level": "subunit" if use_subunits else "sample",
        "dim_subunit": [float(v) for v in dims] if use_subunits else [],
        "subunit_origin": [] if subunit_origin is None else [float(v) for v in subunit_origin],
        "min_obs_per_subunit": int(min_obs_per_subunit),
        "max_obs_per_subunit": -1 if max_obs_per_subunit is None else int(max_obs_per_subunit),
        "subunits_below_min_obs": filtered, "n_skipped": len(skipped),
        "ddof": 0,
    }}
    adata = ad.AnnData(X=x, obs=obs, var=var, uns=uns)
    logger.info("spatial statistics: %d %s x %d features (%d skipped)", adata.n_obs, level, adata.n_vars,
                len(skipped))
    return adata


def _group_of(name: str) -> str:
    rest = name.split("_stat:", 1)[1]
    for g in ("counts", "interactions", "centrality", "connectivity", "moran_features", "moran_clusters"):
        if rest.startswith(g + "_"):
            return g
    return "chull"


def _compute_item(coords, codes, values, config, seed_key):
    return compute_stats(coords, codes, config, values=values, seed_key=seed_key)


def _init_worker() -> None:
    from .graph import set_num_threads

    set_num_threads(1)


def _run_items(items, coords, codes, values, config, *, n_jobs: int, progress: bool):
    from tqdm.auto import tqdm

    def args(item):
        rows = item["rows"]
        return (coords[rows], codes[rows], None if values is None else values[rows], config, item["seed_key"])

    skipped_info = lambda item: (np.full(len(config.feature_names), np.nan),  # noqa: E731
                                 {"status": STATUS_SKIPPED, "skipped_reason": item["skip"], "n_obs": 0,
                                  "n_unlabelled": 0})
    results: list[Any] = [None] * len(items)
    bar = tqdm(total=len(items), desc="Computing spatial graph stats", disable=not progress)
    try:
        if n_jobs == 1 or len(items) == 1:
            for i, item in enumerate(items):
                results[i] = skipped_info(item) if "skip" in item else _compute_item(*args(item))
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker) as pool:
                futures = {}
                for i, item in enumerate(items):
                    if "skip" in item:
                        results[i] = skipped_info(item)
                        bar.update(1)
                    else:
                        futures[i] = pool.submit(_compute_item, *args(item))
                for i, fut in futures.items():
                    results[i] = fut.result()
                    bar.update(1)
    finally:
        bar.close()
    return results


def check_stats_arguments(table: Any, *, sample_key: str, cluster_key: str, spatial_key: str, radii: Any,
                          stats: Any, chull_min_nds: int, chull_min_degree: int, max_clusters: int) -> None:
    """The argument checks of :func:`compute_spatial_stats` that need no computation, on their own.

    A caller that keeps an earlier result runs them first, so an argument error leaves that result alone.

    Parameters
    ----------
    table, sample_key, cluster_key, spatial_key, radii, stats, chull_min_nds, chull_min_degree, max_clusters
        As for :func:`compute_spatial_stats`.

    Returns
    -------
    None
        Raises ``KeyError``/``ValueError``/``TypeError`` naming the argument.
    """
    check_obs_column(table.obs, sample_key, argument="sample_key")
    cats = check_categorical(table.obs, cluster_key, argument="cluster_key")
    coords = check_obsm(table, spatial_key, argument="spatial_key", n_cols=(2, 3))
    normalize_stats(stats)
    check_max_clusters(len(cats.categories), max_clusters, cluster_key=cluster_key, n_radii=len(normalize_radii(radii)),
                       n_samples=int(table.obs[sample_key].nunique()))
    validate_hull_params(chull_min_nds, chull_min_degree, coords.shape[1])
