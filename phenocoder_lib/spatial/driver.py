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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..validation import check_bool, check_categorical, check_int, check_no_missing, check_obs_column, check_obsm
from ..warnings import SpatialStatsWarning
from .stats import (
    DEFAULT_CLUSTERING_SAMPLES,
    STATUS_OK,
    STATUS_SKIPPED,
    StatGroup,
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

__all__ = [
    "DEFAULT_MAX_CLUSTERS",
    "STATS_UNS_KEY",
    "check_max_clusters",
    "check_spatial_stats_args",
    "compute_spatial_stats",
    "sample_order",
]

STATS_UNS_KEY = "spatialgraph_stats"


def sample_order(values: pd.Series) -> list[Any]:
    """Return the samples in a deterministic order: categories for a categorical column, else sorted.

    Parameters
    ----------
    values
        The sample column (``.obs[sample_key]``).

    Returns
    -------
    list
        Every sample once: the categories (used or not) of a categorical column, else the sorted
        unique values (sorted by their text when the types are mixed).

    """
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
    """Refuse a cluster column with more than ``max_clusters`` categories (``k x k`` columns per radius).

    Parameters
    ----------
    n_clusters
        Categories of the cluster column.
    max_clusters
        The caller's limit, an int >= 1.
    cluster_key
        Name of the cluster column (for the message).
    n_radii
        Number of radii (for the size estimate in the message).
    n_samples
        Number of samples (for the size estimate in the message).

    Raises
    ------
    ValueError
        When ``max_clusters`` is not an int >= 1, or there are more categories than it.

    """
    check_int(max_clusters, argument="max_clusters", minimum=1)
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
    stats: StatGroup | Iterable[StatGroup] | None = None,
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
    cluster_key
        Categorical ``.obs`` column; its categories (all of them, used or not) fix the columns, so
        every sample gets the same columns. Objects with a missing label are left out (counted in
        ``obs['n_unlabelled']``).
    spatial_key
        ``.obsm`` key of the coordinates.
    radii
        Graph radii, in the units of the coordinates.
    stats
        Subset of :data:`~phenocoder_lib.spatial.stats.VALID_STATS`; ``None`` computes all six groups.
    layer
        Variables for ``moran_features`` (default ``.X``).
    chull_min_nds
        Minimum component size for the convex hulls (at least the dimension + 1).
    chull_min_degree
        Core degree of the convex-hull components.
    exact
        Compute the average clustering coefficient over all nodes instead of a node sample.
    n_clustering_samples
        Nodes sampled per cluster when not ``exact`` (>= 2).
    use_subunits
        Compute per cube of edge ``dim_subunit`` instead of per sample.
    dim_subunit
        Cube edge (one number, or one per axis).
    min_obs_per_subunit
        Cubes with fewer objects are dropped (counted in ``uns``).
    max_obs_per_subunit
        Larger cubes are subsampled to this many objects (seeded); ``None`` keeps all.
    subunit_origin
        Origin of the cube grid (default: the coordinate origin, shared by all samples).
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
        When nothing could be computed (every sample/subunit skipped), or for invalid arguments
        (:func:`check_spatial_stats_args` lists the checks).

    """
    import anndata as ad

    args = _checked_args(table, sample_key=sample_key, cluster_key=cluster_key, spatial_key=spatial_key,
                         radii=radii, stats=stats, chull_min_nds=chull_min_nds, chull_min_degree=chull_min_degree,
                         n_clustering_samples=n_clustering_samples, n_jobs=n_jobs, use_subunits=use_subunits,
                         dim_subunit=dim_subunit, min_obs_per_subunit=min_obs_per_subunit,
                         max_obs_per_subunit=max_obs_per_subunit, max_clusters=max_clusters)
    config = _stats_config(table, args, layer=layer, exact=exact, n_clustering_samples=n_clustering_samples,
                           seed=seed, chull_min_nds=chull_min_nds, chull_min_degree=chull_min_degree)
    values = table_values(table, layer) if "moran_features" in args.stats else None
    codes = np.asarray(args.categories.codes, dtype=np.int32)
    items, filtered = _work_items(table, args, subunit_origin=subunit_origin, min_obs=int(min_obs_per_subunit),
                                  max_obs=max_obs_per_subunit, seed=seed)
    results = _run_items(items, args.coords, codes, values, config, n_jobs=int(n_jobs), progress=progress)
    x, obs = _result_rows(items, results, config, sample_key=sample_key, use_subunits=args.use_subunits)
    skipped = _report_skipped(items, results, cluster_key=cluster_key, use_subunits=args.use_subunits)
    uns = _settings(args, config, table_key=table_key, cluster_key=cluster_key, spatial_key=spatial_key,
                    layer=layer, subunit_origin=subunit_origin, min_obs_per_subunit=min_obs_per_subunit,
                    max_obs_per_subunit=max_obs_per_subunit, filtered=filtered, n_skipped=len(skipped))
    adata = ad.AnnData(X=x, obs=obs, var=_feature_table(config), uns=uns)
    logger.info("spatial statistics: %d %s x %d features (%d skipped)", adata.n_obs,
                "subunits" if args.use_subunits else "samples", adata.n_vars, len(skipped))
    return adata


def check_spatial_stats_args(table, **kwargs: Any) -> None:
    """Check the arguments of :func:`compute_spatial_stats` without computing anything.

    Callers that must not touch any state on invalid input (e.g. the ``Phenocoder`` facade, before it
    replaces its result) call this first; :func:`compute_spatial_stats` runs the same checks itself.

    Parameters
    ----------
    table
        The object table, as for :func:`compute_spatial_stats`.
    **kwargs
        Any keyword arguments of :func:`compute_spatial_stats`; the ones not checked here (``layer``,
        ``seed``, ``progress``, ...) are ignored, and missing ones take its defaults.

    Raises
    ------
    KeyError
        When ``sample_key``, ``cluster_key`` or ``spatial_key`` is not in the table.
    TypeError
        When the cluster column is not categorical, or a count is not an int.
    ValueError
        For invalid radii, stats, convex-hull or subunit settings, samples with no value, or more
        clusters than ``max_clusters``.

    """
    import inspect

    params = inspect.signature(compute_spatial_stats).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown or "sample_key" not in kwargs:
        raise TypeError(f"check_spatial_stats_args() takes the keyword arguments of compute_spatial_stats "
                        f"(sample_key required); found unknown {unknown} or no sample_key.")
    names = set(inspect.signature(_checked_args).parameters) - {"table"}
    defaults = {k: params[k].default for k in names if k != "sample_key"}
    _checked_args(table, **{**defaults, **{k: v for k, v in kwargs.items() if k in names}})


@dataclass(frozen=True)
class _Args:
    """Checked, normalised arguments of :func:`compute_spatial_stats`."""

    samples_col: pd.Series
    samples: list[Any]
    sample_key: str
    categories: Any  # the cluster column's ``.cat`` accessor
    coords: np.ndarray
    stats: tuple[str, ...]
    radii: tuple[float, ...]
    use_subunits: bool
    dims: np.ndarray | None  # cube edge per axis (subunits only)


def _checked_args(table, *, sample_key, cluster_key, spatial_key, radii, stats, chull_min_nds, chull_min_degree,
                  n_clustering_samples, n_jobs, use_subunits, dim_subunit, min_obs_per_subunit, max_obs_per_subunit,
                  max_clusters) -> _Args:
    """Check every argument against the table (the same checks for the facade and the assets)."""
    check_obs_column(table.obs, sample_key, argument="sample_key")
    cats = check_categorical(table.obs, cluster_key, argument="cluster_key")
    coords = check_obsm(table, spatial_key, argument="spatial_key", n_cols=(2, 3))
    stats_t = normalize_stats(stats)
    radii_t = normalize_radii(radii)
    validate_hull_params(chull_min_nds, chull_min_degree, coords.shape[1])
    check_int(n_clustering_samples, argument="n_clustering_samples", minimum=2,
              fix="The standard error of a sampled clustering coefficient needs 2 nodes.")
    check_int(n_jobs, argument="n_jobs", minimum=1)
    check_no_missing(table.obs, sample_key, argument="sample_key")
    use_subunits = check_bool(use_subunits, argument="use_subunits")
    dims = None
    if use_subunits:
        dims = normalize_dim_subunit(dim_subunit, coords.shape[1])
        check_int(min_obs_per_subunit, argument="min_obs_per_subunit", minimum=1)
        if max_obs_per_subunit is not None:
            check_int(max_obs_per_subunit, argument="max_obs_per_subunit", minimum=1,
                      expected="None or a positive int")
    samples_col = table.obs[sample_key]
    samples = sample_order(samples_col)
    check_max_clusters(len(cats.categories), max_clusters, cluster_key=cluster_key, n_radii=len(radii_t),
                       n_samples=len(samples))
    return _Args(samples_col, samples, sample_key, cats, coords, stats_t, radii_t, use_subunits, dims)


def _stats_config(table, args: _Args, *, layer, exact, n_clustering_samples, seed, chull_min_nds,
                  chull_min_degree) -> StatsConfig:
    """Return the settings shared by every sample; they fix the column layout."""
    var_names = tuple(str(v) for v in table.var_names) if "moran_features" in args.stats else ()
    return StatsConfig(radii=args.radii, stats=args.stats, categories=tuple(str(c) for c in args.categories.categories),
                       var_names=var_names, chull_min_nds=int(chull_min_nds),
                       chull_min_degree=int(chull_min_degree), exact=bool(exact),
                       n_clustering_samples=int(n_clustering_samples), seed=int(seed))


def _work_items(table, args: _Args, *, subunit_origin, min_obs: int, max_obs: int | None,
                seed: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Return one work item per sample (or per subunit), and the cubes dropped per sample.

    An item holds its row name, the table rows, the seed key (so a sample's random choices do not
    depend on the other samples) and the ``.obs`` metadata; a sample without any kept cube is one
    item with a ``skip`` reason.
    """
    # rows of each sample, without a boolean scan per sample
    sample_codes = pd.Index(args.samples).get_indexer(args.samples_col.to_numpy())
    by_sample = np.argsort(sample_codes, kind="stable")
    bounds = np.searchsorted(sample_codes[by_sample], np.arange(len(args.samples) + 1))

    items: list[dict[str, Any]] = []
    filtered: dict[str, int] = {}
    for s_idx, sample in enumerate(args.samples):
        rows = by_sample[bounds[s_idx]:bounds[s_idx + 1]]
        name = str(sample)
        if not args.use_subunits:
            items.append({"name": name, "rows": rows, "seed_key": (stable_key(name),), "meta": {}})
            continue
        subs, n_filtered = partition_subunits(args.coords[rows], args.dims, origin=subunit_origin,
                                              min_obs=min_obs, max_obs=max_obs,
                                              seed=int(seed), seed_key=(stable_key(name),))
        filtered[name] = int(n_filtered)
        if not subs:
            reason = ("no objects" if rows.size == 0 else
                      f"no subunit with >= {min_obs} objects ({n_filtered} smaller cubes)")
            items.append({"name": f"{name}", "rows": None, "seed_key": (), "skip": reason,
                          "meta": {args.sample_key: name, "subunit_id": -1, "subunit_key": "",
                                   "subunit_n_obs": 0, "subunit_n_total": int(rows.size)}})
            continue
        for sub in subs:
            items.append({"name": f"{name} {sub.key_str}", "rows": rows[sub.rows],
                          "seed_key": (stable_key(name), stable_key(sub.key_str)),
                          "meta": {args.sample_key: name, "subunit_id": int(sub.id), "subunit_key": sub.key_str,
                                   "subunit_n_obs": int(sub.rows.shape[0]), "subunit_n_total": sub.n_total}})
    return items, filtered


def _result_rows(items, results, config: StatsConfig, *, sample_key: str,
                 use_subunits: bool) -> tuple[np.ndarray, pd.DataFrame]:
    """Return the feature matrix and the ``.obs`` table (status, counts, standard errors, subunit metadata)."""
    n_feat = len(config.feature_names)
    x = np.full((len(items), n_feat), np.nan, dtype=np.float64)
    se_cols = ([se_column(r, c) for r in config.radii for c in config.categories]
               if "centrality" in config.stats else [])
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
    return x, obs


def _report_skipped(items, results, *, cluster_key: str, use_subunits: bool) -> list[tuple[str, str]]:
    """Return the skipped (name, reason) pairs; warn about them, or raise when every row was skipped."""
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
        # stacklevel 3: the caller of compute_spatial_stats
        warnings.warn(f"{len(skipped)} of {len(items)} {level} skipped (NaN rows with obs['status'] == "
                      f"'skipped'): {preview}{' ...' if len(skipped) > 20 else ''}",
                      SpatialStatsWarning, stacklevel=3)
    return skipped


def _feature_table(config: StatsConfig) -> pd.DataFrame:
    """Return ``.var``: one row per feature with its radius and statistic group."""
    var = pd.DataFrame(index=pd.Index(list(config.feature_names)))
    var["radius"] = [float(n.split("_stat:", 1)[0][len("radius:"):]) for n in var.index]
    var["group"] = [_group_of(g) for g in var.index]
    return var


def _settings(args: _Args, config: StatsConfig, *, table_key, cluster_key, spatial_key, layer, subunit_origin,
              min_obs_per_subunit, max_obs_per_subunit, filtered, n_skipped) -> dict[str, Any]:
    """Return ``.uns``: the settings of the run (JSON-compatible), under :data:`STATS_UNS_KEY`."""
    return {STATS_UNS_KEY: {
        "table_key": "" if table_key is None else str(table_key), "sample_key": args.sample_key,
        "cluster_key": cluster_key, "spatial_key": spatial_key, "radii": list(args.radii),
        "stats": list(args.stats), "categories": list(config.categories), "layer": "" if layer is None else layer,
        "chull_min_nds": config.chull_min_nds, "chull_min_degree": config.chull_min_degree,
        "exact": config.exact, "n_clustering_samples": config.n_clustering_samples, "seed": config.seed,
        "use_subunits": args.use_subunits, "level": "subunit" if args.use_subunits else "sample",
        "dim_subunit": [float(v) for v in args.dims] if args.use_subunits else [],
        "subunit_origin": [] if subunit_origin is None else [float(v) for v in subunit_origin],
        "min_obs_per_subunit": int(min_obs_per_subunit),
        "max_obs_per_subunit": -1 if max_obs_per_subunit is None else int(max_obs_per_subunit),
        "subunits_below_min_obs": filtered, "n_skipped": n_skipped,
        "ddof": 0,
    }}


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
