"""Spatial graph statistics of one sample (or one subunit): six groups, one named row.

Definitions are in ``docs/spatial_statistics.md``; in short, for each radius ``r`` the graph is the
inclusive Euclidean radius graph without self loops (:mod:`.graph`) and

``interactions``
    directed edge counts between clusters, row-normalised counts, and exact (analytic)
    neighbourhood-enrichment z-scores under squidpy's label-permutation null;
``centrality``
    group degree centrality, group closeness centrality (networkx definitions, exact, by BFS) and
    the average clustering coefficient of each cluster (exact, or a seeded node sample with its
    standard error);
``connectivity``
    node degree mean and standard deviation (ddof 0), overall and per cluster;
``moran_features`` / ``moran_clusters``
    Moran's I with row-standardised binary weights of every variable / of every cluster indicator;
``chull``
    convex hulls of the connected components of the ``chull_min_degree``-core (all objects and
    per cluster), summarised by mean and standard deviation (ddof 0) over components.

Every sample gets the same columns, built from the global cluster categories. Statistics about a
cluster that is absent from the sample are NaN, and ``radius:{r}_stat:counts_n_{cluster}`` holds the
number of objects per cluster, so "absent" and "zero" never look alike.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from ..validation import check_categorical, check_int, check_obsm, check_subset, require
from ..warnings import SpatialStatsWarning  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

#: The six statistic groups (the ``stats`` argument takes a subset).
StatGroup = Literal["interactions", "centrality", "connectivity", "moran_features", "moran_clusters", "chull"]
VALID_STATS: tuple[str, ...] = get_args(StatGroup)
CENTRALITY_METRICS: tuple[str, ...] = ("degree_centrality", "average_clustering", "closeness_centrality")
CHULL_METRICS: tuple[str, ...] = (
    "volume_chull", "area_chull", "n_chull", "distance_center_chull", "density_chull",
)
#: Columns of a result row that are not features (they go to ``.obs``).
INFO_COLUMNS: tuple[str, ...] = ("status", "skipped_reason", "n_obs", "n_unlabelled")
STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"
#: Default number of nodes per cluster for the sampled average clustering coefficient.
DEFAULT_CLUSTERING_SAMPLES = 1000
#: Neighbour pairs tested per sampled node (all pairs when a node has fewer).
PAIRS_PER_NODE = 64
#: Samples with fewer objects run single-threaded: a parallel launch costs more than it saves
#: there, and on a busy machine a descheduled worker thread stalls every parallel region.
SERIAL_BELOW_N = 5_000


def format_radius(radius: float) -> str:
    """Return a radius as it appears in feature names.

    Parameters
    ----------
    radius
        The radius.

    Returns
    -------
    str
        ``'25'`` for ``25`` and ``25.0``; other values their shortest float repr (``'12.5'``).

    """
    r = float(radius)
    return str(int(r)) if r.is_integer() else repr(r)


def is_feature_column(name: str) -> bool:
    """Tell feature columns (they contain ``'_stat:'``) from the metadata columns of a result row.

    Parameters
    ----------
    name
        Column name.

    Returns
    -------
    bool
        True for a feature column.

    """
    return "_stat:" in str(name)


@dataclass(frozen=True)
class StatsConfig:
    """Validated settings shared by every sample of one run (fixes the column layout).

    Parameters
    ----------
    radii
        Sorted, unique radii.
    stats
        Statistic groups, in the order of :data:`VALID_STATS`.
    categories
        Cluster categories (str) of the whole table.
    var_names
        Variables for ``moran_features``.
    chull_min_nds
        Minimum component size for the convex hulls.
    chull_min_degree
        Core degree of the convex-hull components.
    exact
        Exact average clustering coefficient instead of a node sample.
    n_clustering_samples
        Nodes sampled per cluster when not ``exact``.
    seed
        Seed of the node samples.

    """

    radii: tuple[float, ...]
    stats: tuple[str, ...]
    categories: tuple[str, ...]
    var_names: tuple[str, ...] = ()
    chull_min_nds: int = 10
    chull_min_degree: int = 3
    exact: bool = False
    n_clustering_samples: int = DEFAULT_CLUSTERING_SAMPLES
    seed: int = 0
    feature_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_names", tuple(feature_names(
            self.radii, self.stats, self.categories, self.var_names)))


def normalize_stats(stats: StatGroup | Iterable[StatGroup] | None) -> tuple[str, ...]:
    """Return the statistic groups to compute, in canonical order.

    Parameters
    ----------
    stats
        One group name, several, or ``None`` for all six.

    Returns
    -------
    tuple of str
        The groups in the order of :data:`VALID_STATS`.

    Raises
    ------
    ValueError
        For unknown names or an empty selection.

    """
    if stats is None:
        return VALID_STATS
    if isinstance(stats, str):
        stats = [stats]
    chosen = check_subset(stats, StatGroup, argument="stats")
    require(len(chosen) > 0, f"stats={list(chosen)!r} is empty; pass None for all groups or a subset of "
            f"{list(VALID_STATS)}.")
    return tuple(s for s in VALID_STATS if s in chosen)


def normalize_radii(radii: float | Sequence[float]) -> tuple[float, ...]:
    """Validate radii (positive, finite) and return them sorted and unique.

    Parameters
    ----------
    radii
        One radius or several, in the units of the coordinates.

    Returns
    -------
    tuple of float
        Sorted, unique radii.

    Raises
    ------
    ValueError
        For an empty selection, a string, or values that are not positive and finite.

    """
    values = np.atleast_1d(np.asarray(radii, dtype=np.float64)) if not isinstance(radii, str) else None
    if values is None or values.ndim != 1 or values.size == 0 or not np.isfinite(values).all() \
            or (values <= 0).any():
        raise ValueError(f"radii={radii!r} must be a positive number or a non-empty sequence of positive "
                         "numbers in the units of the coordinates, e.g. (25, 50).")
    return tuple(float(r) for r in np.unique(values))


def feature_names(radii: Sequence[float], stats: Sequence[str], categories: Sequence[str],
                  var_names: Sequence[str] = ()) -> list[str]:
    """Return the column names of a result row, ``radius:{r}_stat:{group}_{column}`` (fixed order).

    Parameters
    ----------
    radii
        Radii.
    stats
        Statistic groups.
    categories
        Cluster categories of the whole table.
    var_names
        Variables for ``moran_features``.

    Returns
    -------
    list of str
        The feature names.

    Raises
    ------
    ValueError
        When categories or variables give duplicate names.

    """
    cats = [str(c) for c in categories]
    names: list[str] = []
    for r in radii:
        p = f"radius:{format_radius(r)}_stat:"
        names += [f"{p}counts_total_objects", f"{p}counts_total_edges"]
        names += [f"{p}counts_n_{c}" for c in cats]
        if "interactions" in stats:
            for col in ("interaction_norm", "interaction", "enrichment_zscore"):
                names += [f"{p}interactions_{col}_{a}_{b}" for a in cats for b in cats]
        if "centrality" in stats:
            names += [f"{p}centrality_{c}_{m}" for c in cats for m in CENTRALITY_METRICS]
        if "connectivity" in stats:
            names += [f"{p}connectivity_mean", f"{p}connectivity_std"]
            names += [f"{p}connectivity_degree_{c}_{s}" for c in cats for s in ("mean", "std")]
        if "moran_features" in stats:
            names += [f"{p}moran_features_moranI_{v}" for v in var_names]
        if "moran_clusters" in stats:
            names += [f"{p}moran_clusters_moranI_{c}" for c in cats]
        if "chull" in stats:
            for key in ["all"] + [f"cluster:{c}" for c in cats]:
                names += [f"{p}chull_{key}_{m}_{s}" for m in CHULL_METRICS for s in ("mean", "sd")]
                names.append(f"{p}chull_{key}_n_obs_chull")
    if len(set(names)) != len(names):
        dup = pd.Index(names)[pd.Index(names).duplicated()].unique().tolist()
        raise ValueError(f"cluster categories or variable names produce duplicate feature names {dup[:5]}; "
                         "rename the categories (or variables) so that their str() values are unique.")
    return names


def se_column(radius: float, cluster: str) -> str:
    """Return the name of the info column with the standard error of a sampled average clustering coefficient.

    Parameters
    ----------
    radius
        The radius.
    cluster
        The cluster category.

    Returns
    -------
    str
        ``radius:{r}_se:centrality_{cluster}_average_clustering``.

    """
    return f"radius:{format_radius(radius)}_se:centrality_{cluster}_average_clustering"


def stable_key(value: Any) -> int:
    """Return a platform-independent 32-bit key of ``str(value)`` for seeding.

    Parameters
    ----------
    value
        Anything with a stable ``str()`` (sample id, cube key).

    Returns
    -------
    int
        CRC-32 of the UTF-8 text.

    """
    return zlib.crc32(str(value).encode("utf-8"))


# --------------------------------------------------------------------------------------------------
# core computation on arrays
# --------------------------------------------------------------------------------------------------

@dataclass
class _Context:
    graph: Any
    lab: np.ndarray  # int32 codes in graph order
    counts: np.ndarray  # objects per global category
    present: np.ndarray  # indices of present categories
    coords: np.ndarray  # (n, d) in graph order
    n: int
    k: int


def compute_stats(
    coords: np.ndarray,
    codes: np.ndarray,
    config: StatsConfig,
    *,
    values: np.ndarray | None = None,
    seed_key: Sequence[int] = (),
    profile: Callable[[str, float | None], AbstractContextManager] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Compute one row of statistics from arrays.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates.
    codes
        ``(n,)`` integer codes into ``config.categories``; negative codes (missing labels) are dropped.
    config
        Column layout and settings.
    values
        ``(n, n_vars)`` variables for ``moran_features`` (aligned with ``config.var_names``).
    seed_key
        Non-negative ints mixed into the seed (sample and subunit keys), so a sample's random
        choices do not depend on which other samples are in the run.
    profile
        If given, ``profile(step, radius)`` is a context manager entered around each step
        (``'graph'`` with radius ``None``, then per radius ``'edge_pass'`` and the group names),
        e.g. to time it (benchmarks).

    Returns
    -------
    (features, info)
        ``features`` is float64 aligned with ``config.feature_names``; ``info`` holds ``status``,
        ``skipped_reason``, ``n_obs``, ``n_unlabelled`` and the clustering standard errors.

    """
    k = len(config.categories)
    codes = np.asarray(codes)
    labelled = codes >= 0
    n_unlabelled = int((~labelled).sum())
    info: dict[str, Any] = {"status": STATUS_OK, "skipped_reason": "", "n_obs": int(labelled.sum()),
                            "n_unlabelled": n_unlabelled}
    out = np.full(len(config.feature_names), np.nan, dtype=np.float64)
    if n_unlabelled:
        coords = np.asarray(coords)[labelled]
        codes = codes[labelled]
        if values is not None:
            values = np.asarray(values)[labelled]
    n = int(codes.shape[0])
    if n and int(codes.max()) >= k:
        raise ValueError(f"codes must index config.categories (0..{k - 1}), found {int(codes.max())}.")
    counts = np.bincount(codes.astype(np.int64), minlength=k) if n else np.zeros(k, np.int64)
    present = np.flatnonzero(counts > 0)
    if n == 0:
        info.update(status=STATUS_SKIPPED, skipped_reason="no labelled objects")
        return out, info
    if present.size < 2:
        info.update(status=STATUS_SKIPPED,
                    skipped_reason=f"only one cluster present ({config.categories[present[0]]!r}); "
                                   "the statistics need at least two")
        return out, info

    from .graph import set_num_threads

    previous = set_num_threads(1) if n < SERIAL_BELOW_N else None
    try:
        return _compute(coords, codes, values, config, seed_key, profile, out, info, counts, present, n, k)
    finally:
        if previous is not None:
            set_num_threads(previous)


def _compute(coords, codes, values, config, seed_key, profile, out, info, counts, present, n, k):
    from . import _kernels as K
    from .graph import build_radius_graph

    section = profile if profile is not None else (lambda _name, _radius=None: nullcontext())
    with section("graph", None):
        graph = build_radius_graph(coords, config.radii)
        lab = codes[graph.order].astype(np.int32)
    d = graph.n_dims
    ctx = _Context(graph, lab, counts, present, graph.coords[:, :d], n, k)
    zvals = None
    if "moran_features" in config.stats and len(config.var_names):
        require(values is not None and np.asarray(values).shape == (n, len(config.var_names)),
                "moran_features needs `values` of shape (n_objects, n_vars) matching config.var_names.")
        with section("moran_features", None):
            zvals = np.asarray(values, dtype=np.float64)[graph.order]
            zvals = zvals - zvals.mean(axis=0)

    pos = {name: i for i, name in enumerate(config.feature_names)}
    row: dict[str, float] = {}
    for ri, r in enumerate(config.radii):
        view = graph.view(r)
        p = f"radius:{format_radius(r)}_stat:"
        n_chunks = K.default_chunks(n)
        with section("edge_pass", r):
            cnt, gdeg, mnum, n_nonisolated, t2 = K.label_pass(
                view.start, view.degree, view.indices, lab, k, counts / n, n_chunks)
        s0 = int(view.degree.sum())
        row[f"{p}counts_total_objects"] = n
        row[f"{p}counts_total_edges"] = s0 / 2
        for c in range(k):
            row[f"{p}counts_n_{config.categories[c]}"] = counts[c]
        for group in config.stats:
            with section(group, r):
                _group(group, row, info, p, ctx, config, view, ri, r, seed_key, cnt, gdeg, mnum,
                       n_nonisolated, s0, int(t2), zvals, n_chunks)
    for name, val in row.items():
        out[pos[name]] = val
    return out, info


def _group(group, row, info, p, ctx, config, view, ri, r, seed_key, cnt, gdeg, mnum, n_nonisolated, s0, t2,
           zvals, n_chunks) -> None:
    """Fill ``row`` with one group's columns at one radius."""
    from . import _kernels as K

    n, counts, present = ctx.n, ctx.counts, ctx.present
    if group == "interactions":
        _interactions(row, p, ctx, config, cnt, s0, t2)
    elif group == "centrality":
        _centrality(row, info, p, ctx, config, view, gdeg, ri, r, seed_key)
    elif group == "connectivity":
        _connectivity(row, p, ctx, config, view)
    elif group == "moran_features":
        if zvals is not None:
            num = K.moran_numerators(view.start, view.degree, view.indices, zvals, n_chunks)
            ss = (zvals * zvals).sum(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                moran = n / n_nonisolated * num / ss if n_nonisolated else np.full(len(num), np.nan)
            moran = np.where(ss > 0, moran, np.nan)
            for v, val in zip(config.var_names, moran, strict=True):
                row[f"{p}moran_features_moranI_{v}"] = val
    elif group == "moran_clusters":
        pc = counts / n
        denom = n * pc * (1.0 - pc)
        for c in present:
            if n_nonisolated and denom[c] > 0:
                row[f"{p}moran_clusters_moranI_{config.categories[c]}"] = \
                    n / n_nonisolated * mnum[c] / denom[c]
    elif group == "chull":
        _chull(row, p, ctx, config, view)


def _falling(x: np.ndarray | float, m: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.ones_like(x)
    for t in range(m):
        out = out * np.maximum(x - t, 0.0)
    return out


def enrichment_moments(sizes: np.ndarray, s0: float, t2: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of the directed edge counts ``C_ab`` under uniform relabelling.

    ``sizes`` are the cluster sizes (``n = sum``), ``s0`` the number of directed edges and ``t2`` is
    ``sum_v d_v (d_v - 1)`` of a symmetric 0/1 adjacency without self loops. This is the null of
    squidpy's ``nhood_enrichment`` (labels shuffled over all objects), in closed form.

    Parameters
    ----------
    sizes
        ``(k,)`` cluster sizes.
    s0
        Number of directed edges.
    t2
        ``sum_v d_v (d_v - 1)``.

    Returns
    -------
    (mean, var)
        ``(k, k)`` float64 mean and variance of ``C_ab``.

    """
    na = np.asarray(sizes, dtype=np.float64)
    n = float(na.sum())
    k = na.shape[0]
    f2, f3, f4 = _falling(n, 2), _falling(n, 3), _falling(n, 4)
    safe = lambda num, den: np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # noqa: E731
    a1 = na[:, None]
    b1 = na[None, :]
    same = np.eye(k, dtype=bool)
    p2 = np.where(same, safe(_falling(na, 2), f2)[:, None] * np.ones((1, k)), safe(a1 * b1, f2))
    p3_abb = np.where(same, 0.0, safe(a1 * _falling(b1, 2), f3))
    p3_aab = np.where(same, 0.0, safe(_falling(a1, 2) * b1, f3))
    p3_aaa = safe(_falling(na, 3), f3)
    p4 = np.where(same, safe(_falling(na, 4), f4)[:, None] * np.ones((1, k)),
                  safe(_falling(a1, 2) * _falling(b1, 2), f4))
    mean = s0 * p2
    disjoint = s0 * s0 - 2.0 * s0 - 4.0 * t2
    second = s0 * p2 + disjoint * p4
    second = second + np.where(same, s0 * p2 + 4.0 * t2 * p3_aaa[:, None], t2 * (p3_abb + p3_aab))
    var = second - mean * mean
    return mean, var


def _interactions(row, p, ctx: _Context, config: StatsConfig, cnt: np.ndarray, s0: int, t2: int) -> None:
    cats = config.categories
    rowsum = cnt.sum(axis=1)
    mean, var = enrichment_moments(ctx.counts, float(s0), float(t2))
    for a in ctx.present:
        for b in ctx.present:
            ca, cb = cats[a], cats[b]
            row[f"{p}interactions_interaction_{ca}_{cb}"] = cnt[a, b]
            if rowsum[a] > 0:
                row[f"{p}interactions_interaction_norm_{ca}_{cb}"] = cnt[a, b] / rowsum[a]
            # a variance that is zero up to rounding means a degenerate null: z is undefined
            if var[a, b] > 1e-10 * max(1.0, mean[a, b] ** 2):
                row[f"{p}interactions_enrichment_zscore_{ca}_{cb}"] = (cnt[a, b] - mean[a, b]) / np.sqrt(var[a, b])


def _centrality(row, info, p, ctx: _Context, config: StatsConfig, view, gdeg, ri, r, seed_key) -> None:
    from . import _kernels as K

    cats = config.categories
    n = ctx.n
    present = ctx.present.astype(np.int32)
    sums = K.group_closeness_sums(view.start, view.degree, view.indices, ctx.lab, present)
    # average clustering coefficient: every node exactly, or a two-stage sample (nodes, then pairs)
    members_by_cluster = _members(ctx.lab, ctx.k)
    m = config.n_clustering_samples
    for t, c in enumerate(present):
        members = members_by_cluster[c]
        nc = members.shape[0]
        if config.exact or nc <= m:
            vals = K.local_clustering(view.start, view.degree, view.indices, view.run_ends,
                                      members.astype(np.int64), K.default_chunks(nc))
            se = 0.0
        else:
            rng = np.random.default_rng(np.random.SeedSequence(
                [int(config.seed), *[int(s) for s in seed_key], ri, int(c)]))
            nodes = members[np.sort(rng.choice(nc, size=m, replace=False))].astype(np.int64)
            uniforms = rng.random((m, PAIRS_PER_NODE, 2))
            vals = K.sampled_local_clustering(view.start, view.degree, view.indices, view.run_ends, nodes,
                                              uniforms)
            se = _two_stage_se(vals, view.degree[nodes], nc)
        name = cats[c]
        row[f"{p}centrality_{name}_degree_centrality"] = gdeg[c] / (n - nc)
        row[f"{p}centrality_{name}_closeness_centrality"] = (n - nc) / sums[t] if sums[t] > 0 else 0.0
        row[f"{p}centrality_{name}_average_clustering"] = float(vals.mean())
        info[se_column(r, name)] = se


def _two_stage_se(vals: np.ndarray, degrees: np.ndarray, n_cluster: int) -> float:
    """Return the standard error of the mean of a two-stage sample (nodes without replacement, then pairs).

    ``v = (1 - f) s^2 / m + f / m^2 * sum_v c_v (1 - c_v) / (q - 1)`` with ``f = m / N``; nodes
    whose pairs were all tested contribute no second-stage variance.
    """
    m = vals.shape[0]
    f = m / n_cluster
    pairs_sampled = degrees * (degrees - 1) // 2 > PAIRS_PER_NODE
    within = np.where(pairs_sampled, vals * (1.0 - vals) / (PAIRS_PER_NODE - 1), 0.0)
    return float(np.sqrt((1.0 - f) * vals.var(ddof=1) / m + f * within.sum() / m**2))


def _members(lab: np.ndarray, k: int) -> list[np.ndarray]:
    """Graph node ids per label (ascending node id)."""
    order = np.argsort(lab, kind="stable")
    bounds = np.searchsorted(lab[order], np.arange(k + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(k)]


def _connectivity(row, p, ctx: _Context, config: StatsConfig, view) -> None:
    deg = view.degree.astype(np.float64)
    row[f"{p}connectivity_mean"] = deg.mean()
    row[f"{p}connectivity_std"] = deg.std(ddof=0)
    s1 = np.bincount(ctx.lab, weights=deg, minlength=ctx.k)
    s2 = np.bincount(ctx.lab, weights=deg * deg, minlength=ctx.k)
    for c in ctx.present:
        nc = ctx.counts[c]
        mean = s1[c] / nc
        row[f"{p}connectivity_degree_{config.categories[c]}_mean"] = mean
        row[f"{p}connectivity_degree_{config.categories[c]}_std"] = np.sqrt(max(s2[c] / nc - mean * mean, 0.0))


def hull_components(view, coords: np.ndarray, lab: np.ndarray, *, same_label: bool, min_nds: int,
                    min_degree: int) -> list[tuple[int, np.ndarray]]:
    """Return the components of the ``min_degree``-core with at least ``min_nds`` nodes.

    Parameters
    ----------
    view
        The graph at one radius.
    coords
        Coordinates in graph order (unused by the search; kept for callers that pass them).
    lab
        int32 cluster code per graph node.
    same_label
        Only edges between objects of the same cluster (per-cluster hulls) when True.
    min_nds
        Smallest component kept.
    min_degree
        Core degree: nodes of lower degree are peeled off first.

    Returns
    -------
    list of (int, numpy.ndarray)
        The label (first node's) and the graph node ids of each component.

    """
    from . import _kernels as K

    alive = K.kcore(view.start, view.degree, view.indices, lab, same_label, int(min_degree))
    comp, nc = K.components(view.start, view.degree, view.indices, lab, same_label, alive)
    if nc == 0:
        return []
    keep = comp >= 0
    sizes = np.bincount(comp[keep], minlength=nc)
    big = sizes >= min_nds
    if not big.any():
        return []
    nodes = np.flatnonzero(keep & big[np.where(keep, comp, 0)])
    order = np.argsort(comp[nodes], kind="stable")
    nodes = nodes[order]
    cuts = np.flatnonzero(np.diff(comp[nodes])) + 1
    return [(int(lab[g[0]]), g) for g in np.split(nodes, cuts)]


def hull_metrics(points: np.ndarray, center: np.ndarray) -> tuple[float, float, float, float, float] | None:
    """Return the convex-hull metrics of one component, or None when it is degenerate.

    In 2-D, volume is the polygon area and area its perimeter (scipy/Qhull conventions).

    Parameters
    ----------
    points
        ``(m, d)`` coordinates of the component.
    center
        ``(d,)`` centre of the sample.

    Returns
    -------
    tuple of float or None
        ``(volume, area, n, distance to center, density)``; None for flat or zero-volume hulls.

    """
    from scipy.spatial import ConvexHull, QhullError

    if np.ptp(points, axis=0).min() <= 0:
        return None
    try:
        hull = ConvexHull(points)
    except QhullError:
        return None
    vol = float(hull.volume)
    if not vol > 0:
        return None
    npts = points.shape[0]
    dist = float(np.linalg.norm(points.mean(axis=0) - center))
    return vol, float(hull.area), float(npts), dist, npts / vol


def _chull(row, p, ctx: _Context, config: StatsConfig, view) -> None:
    # axes on which the whole sample is flat (2-D data stored with a constant z) carry no extent
    axes = np.ptp(ctx.coords, axis=0) > 0
    coords = ctx.coords[:, axes] if 2 <= axes.sum() < axes.size else ctx.coords
    center = coords.mean(axis=0)
    for same_label in (False, True):
        comps = hull_components(view, ctx.coords, ctx.lab, same_label=same_label,
                                min_nds=config.chull_min_nds, min_degree=config.chull_min_degree)
        per_key: dict[str, list[tuple]] = {}
        for label, nodes in comps:
            metrics = hull_metrics(coords[nodes], center)
            if metrics is None:
                continue
            key = f"cluster:{config.categories[label]}" if same_label else "all"
            per_key.setdefault(key, []).append(metrics)
        keys = [f"cluster:{config.categories[c]}" for c in ctx.present] if same_label else ["all"]
        for key in keys:
            found = np.asarray(per_key.get(key, []), dtype=np.float64).reshape(-1, len(CHULL_METRICS))
            row[f"{p}chull_{key}_n_obs_chull"] = found.shape[0]
            if found.shape[0]:
                for j, m in enumerate(CHULL_METRICS):
                    row[f"{p}chull_{key}_{m}_mean"] = found[:, j].mean()
                    row[f"{p}chull_{key}_{m}_sd"] = found[:, j].std(ddof=0)


# --------------------------------------------------------------------------------------------------
# one AnnData in, one named row out
# --------------------------------------------------------------------------------------------------

def row_frame(name: str, features: np.ndarray, info: dict[str, Any], config: StatsConfig,
              extra: dict[str, Any] | None = None) -> pd.DataFrame:
    """Assemble one result row: features (float64) then metadata columns.

    Parameters
    ----------
    name
        Row name.
    features
        Values aligned with ``config.feature_names``.
    info
        Status, counts and standard errors (from :func:`compute_stats`).
    config
        The column layout.
    extra
        More metadata columns, placed before ``info``.

    Returns
    -------
    pandas.DataFrame
        One row indexed by ``str(name)``.

    """
    data: dict[str, Any] = dict(zip(config.feature_names, features, strict=True))
    if extra:
        data.update(extra)
    data.update(info)
    return pd.DataFrame({k: [v] for k, v in data.items()}, index=pd.Index([str(name)]))


def sample_spatial_stats(
    adata,
    *,
    cluster_key: str = "leiden",
    spatial_key: str = "spatial",
    radii: float | Sequence[float] = (25, 50),
    stats: StatGroup | Iterable[StatGroup] | None = None,
    categories: Sequence[Any] | None = None,
    layer: str | None = None,
    name: str | None = None,
    chull_min_nds: int = 10,
    chull_min_degree: int = 3,
    exact: bool = False,
    n_clustering_samples: int = DEFAULT_CLUSTERING_SAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """Spatial graph statistics of one sample: one AnnData in, one named row out.

    Parameters
    ----------
    adata
        Objects of one sample (or one subunit): coordinates in ``.obsm[spatial_key]`` (2-D or 3-D),
        a categorical ``.obs[cluster_key]``, and, for ``moran_features``, the variables in ``.X`` (or
        ``.layers[layer]``). Not modified.
    cluster_key, spatial_key
        Where the labels and coordinates are.
    radii
        Graph radii, in the units of the coordinates.
    stats
        Subset of :data:`VALID_STATS`; ``None`` computes all six groups.
    categories
        Global cluster categories that fix the columns (pass the categories of the whole table so
        every sample gets the same columns). Default: the categories of ``.obs[cluster_key]``.
    layer
        Variables for ``moran_features`` (default ``.X``).
    name
        Row name (default: ``'sample'``); also mixed into the seed.
    chull_min_nds, chull_min_degree
        Minimum component size and core degree for the convex hulls.
    exact
        Compute the average clustering coefficient over all nodes instead of a node sample.
    n_clustering_samples
        Nodes sampled per cluster when not ``exact`` (clusters at most this large are exact).
    seed
        Seed of the node sample.

    Returns
    -------
    pandas.DataFrame
        One row indexed by ``name``: the feature columns ``radius:{r}_stat:...`` (float64), then
        ``status`` (``'ok'``/``'skipped'``), ``skipped_reason``, ``n_obs``, ``n_unlabelled`` and the
        standard errors ``radius:{r}_se:centrality_{c}_average_clustering``. A sample that cannot
        be computed (no objects, fewer than two clusters) gives NaN features with status
        ``'skipped'`` and a :class:`SpatialStatsWarning`.

    """
    import warnings

    cats = check_categorical(adata.obs, cluster_key, argument="cluster_key")
    coords = check_obsm(adata, spatial_key, argument="spatial_key", n_cols=(2, 3))
    categories = list(cats.categories) if categories is None else list(categories)
    config, values = _config_and_values(adata, categories, radii=radii, stats=stats, layer=layer,
                                        chull_min_nds=chull_min_nds, chull_min_degree=chull_min_degree,
                                        exact=exact, n_clustering_samples=n_clustering_samples,
                                        seed=seed, n_dims=coords.shape[1])
    codes = codes_for(adata.obs[cluster_key], categories)
    name = "sample" if name is None else str(name)
    features, info = compute_stats(coords, codes, config, values=values, seed_key=(stable_key(name),))
    if info["status"] != STATUS_OK:
        warnings.warn(f"spatial statistics skipped for {name!r}: {info['skipped_reason']}",
                      SpatialStatsWarning, stacklevel=2)
    return row_frame(name, features, info, config)


def codes_for(labels: pd.Series, categories: Sequence[Any]) -> np.ndarray:
    """Return the integer codes of ``labels`` into ``categories`` (-1 for missing).

    Parameters
    ----------
    labels
        Cluster labels of the objects.
    categories
        The global categories.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int32 codes.

    Raises
    ------
    ValueError
        When a label is not among ``categories``.

    """
    cat = pd.Categorical(labels)
    known = pd.Index(categories)
    unknown = [c for c in cat.categories if c not in known]
    if unknown:
        raise ValueError(f"cluster labels {unknown[:10]} are not among the global categories "
                         f"{list(known)[:20]}; pass categories that include every label.")
    return known.get_indexer(np.asarray(cat.astype(object))).astype(np.int32) if len(cat) else \
        np.zeros(0, np.int32)


def _config_and_values(adata, categories, *, radii, stats, layer, chull_min_nds, chull_min_degree, exact,
                       n_clustering_samples, seed, n_dims) -> tuple[StatsConfig, np.ndarray | None]:
    stats_t = normalize_stats(stats)
    radii_t = normalize_radii(radii)
    validate_hull_params(chull_min_nds, chull_min_degree, n_dims)
    check_int(n_clustering_samples, argument="n_clustering_samples", minimum=2,
              fix="The standard error of a sampled clustering coefficient needs 2 nodes.")
    values = None
    var_names: tuple[str, ...] = ()
    if "moran_features" in stats_t:
        values = table_values(adata, layer)
        var_names = tuple(str(v) for v in adata.var_names)
    config = StatsConfig(radii=radii_t, stats=stats_t, categories=tuple(str(c) for c in categories),
                         var_names=var_names, chull_min_nds=int(chull_min_nds),
                         chull_min_degree=int(chull_min_degree), exact=bool(exact),
                         n_clustering_samples=int(n_clustering_samples), seed=int(seed))
    return config, values


def validate_hull_params(chull_min_nds: int, chull_min_degree: int, n_dims: int) -> None:
    """Check the convex-hull settings against the coordinate dimension.

    Parameters
    ----------
    chull_min_nds
        Minimum component size: at least ``n_dims + 1`` points span a hull.
    chull_min_degree
        Core degree, >= 0.
    n_dims
        Number of coordinate axes.

    Raises
    ------
    ValueError
        When either setting is out of range.

    """
    check_int(chull_min_nds, argument="chull_min_nds", minimum=n_dims + 1,
              fix=f"A convex hull in {n_dims}-D needs at least {n_dims + 1} points (default 10).")
    check_int(chull_min_degree, argument="chull_min_degree", minimum=0, fix="The default is 3.")


def table_values(adata, layer: str | None) -> np.ndarray:
    """Return the dense float64 variables of ``adata`` (``.X`` or a layer) for Moran's I.

    Parameters
    ----------
    adata
        The object table.
    layer
        Layer name, or ``None`` for ``.X``.

    Returns
    -------
    numpy.ndarray
        ``(n_obs, n_vars)`` float64; NaN/inf values are kept (with a ``SpatialStatsWarning``).

    Raises
    ------
    KeyError
        When ``layer`` is not a layer of the table.
    ValueError
        When ``.X`` is None and there are variables.
    TypeError
        When the variables are not numeric.

    """
    import scipy.sparse as sp

    from ..validation import check_key

    if layer is None:
        x = adata.X
        if x is None and adata.n_vars == 0:  # nothing to correlate: no moran_features columns
            return np.zeros((adata.n_obs, 0), dtype=np.float64)
        if x is None:
            raise ValueError("moran_features needs variables in .X, but .X is None; pass layer=... or "
                             "drop 'moran_features' from stats.")
    else:
        check_key(adata.layers, layer, argument="layer", what="layer of the table")
        x = adata.layers[layer]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    if x.dtype.kind not in "iufb":
        raise TypeError(f"moran_features needs numeric variables, found dtype {x.dtype}.")
    x = x.astype(np.float64, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        import warnings

        from ..warnings import SpatialStatsWarning

        where = ".X" if layer is None else f"layers[{layer!r}]"
        names = [str(v) for v, b in zip(adata.var_names, bad.any(axis=0), strict=True) if b]
        warnings.warn(f"moran_features: {int(bad.any(axis=1).sum())} objects have NaN/inf values in {where} "
                      f"(variables {names[:10]}); Moran's I of those variables is NaN in the samples that hold them. "
                      "Impute or drop those objects, or leave 'moran_features' out of stats.",
                      SpatialStatsWarning, stacklevel=3)
    return x
