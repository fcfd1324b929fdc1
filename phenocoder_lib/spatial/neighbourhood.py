"""Neighbourhood composition: who sits next to whom, per object and summarized per well.

A well's *arrangement* (types mixed, in patches, or one type on a ring) leaves every cell and the type mix
unchanged; only the neighbours change. This module measures it with the types of the objects (a few cell
types, e.g. clusters of the latents fitted once on the control wells) and their positions:

- :func:`fit_cell_types` -- k-means on object features (the control wells' objects), so every well is typed
  by the same centres; :meth:`CellTypes.assign` types any objects;
- :func:`neighbourhood_composition` -- per object, the fraction of each type among its ``k`` nearest
  neighbours or among those within a radius;
- :func:`arrangement_features` -- one well's named summary (the mean composition around each type, the
  homotypic fraction and assortativity, type co-occurrence in distance shells, nearest-neighbour distances
  between types, and each type's distance to the well centre);
- :func:`arrangement_table` -- :func:`arrangement_features` of every well of an object table;
- :func:`well_arrangement` -- both steps: types fitted on the control wells, then every well's features.

Distances are in units of the well's median nearest-neighbour distance, so the features do not depend on
the pixel size or the cell density; a well's values are meant to be normalized against the control wells
of its plate (:func:`phenocoder_lib.profiles.normalize_profiles`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RADIAL_BINS",
    "DEFAULT_SHELLS",
    "CellTypes",
    "arrangement_features",
    "arrangement_table",
    "fit_cell_types",
    "neighbourhood_composition",
    "well_arrangement",
]

#: Distance shells of the co-occurrence features, in units of the well's median nearest-neighbour distance:
#: the first ring of neighbours (up to 1.25), the next (diagonal neighbours on a packed layout, up to 1.75),
#: then ever wider shells out to the far field (a ring's diameter on the screen). One shell holding both the
#: first and the second ring would average a pattern's opposite signs (alternating types: first neighbours
#: differ, diagonal ones agree).
DEFAULT_SHELLS = (0.0, 1.25, 1.75, 2.5, 4.0, 7.0)
#: Radial bins of the composition-by-distance-to-centre features: quantiles of all objects' distances.
DEFAULT_RADIAL_BINS = 4


@dataclass(frozen=True)
class CellTypes:
    """Cell types as k-means centres in the feature space of the objects.

    Parameters
    ----------
    centres
        (n_types, n_features) centres; rows are ordered by decreasing size of the type in the fitting data,
        so type 0 is the most frequent.

    """

    centres: np.ndarray

    @property
    def n_types(self) -> int:
        """Number of types."""
        return int(self.centres.shape[0])

    def assign(self, values: np.ndarray) -> np.ndarray:
        """Type of each object: the nearest centre (Euclidean).

        Parameters
        ----------
        values
            (n_objects, n_features) object features, the same columns as the fitting data.

        Returns
        -------
        (n_objects,) int type ids in ``[0, n_types)``.

        """
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.centres.shape[1]:
            raise ValueError(f"values must be (n_objects, {self.centres.shape[1]}), got shape {values.shape}.")
        d = ((values[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return d.argmin(1).astype(np.int64)


def fit_cell_types(values: np.ndarray, *, n_types: int = 3, seed: int = 0) -> CellTypes:
    """Fit ``n_types`` cell types with k-means on object features.

    Fit them on the control wells' objects and type every well with :meth:`CellTypes.assign`: the types
    are then the same in every well and a treatment cannot move the centres. The features are used as they
    are: standardizing CVAE latents gives their near-empty dimensions the weight of the informative ones
    (on the screen, ARI against the planted types 0.50 instead of 0.99).

    Parameters
    ----------
    values
        (n_objects, n_features) object features (e.g. the CVAE latents), finite.
    n_types
        Number of types (>= 2, at most the number of objects).
    seed
        Seed of the k-means initializations.

    Returns
    -------
    :class:`CellTypes` with centres ordered by decreasing type size.

    """
    from sklearn.cluster import KMeans

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or not np.isfinite(values).all():
        raise ValueError(f"values must be a finite 2-D (n_objects, n_features) array, got shape {values.shape}.")
    if not 2 <= int(n_types) <= len(values):
        raise ValueError(f"n_types={n_types!r} must be between 2 and the number of objects ({len(values)}).")
    km = KMeans(n_clusters=int(n_types), n_init=10, random_state=seed).fit(values)
    order = np.argsort(-np.bincount(km.labels_, minlength=int(n_types)), kind="stable")
    return CellTypes(km.cluster_centers_[order])


def _check_layout(coords: np.ndarray, types: np.ndarray, n_types: int) -> tuple[np.ndarray, np.ndarray]:
    coords = np.asarray(coords, dtype=np.float64)
    types = np.asarray(types)
    if coords.ndim != 2 or coords.shape[1] not in (2, 3):
        raise ValueError(f"coords must be (n_objects, 2 or 3), got shape {coords.shape}.")
    if types.shape != (len(coords),):
        raise ValueError(f"types has shape {types.shape} for {len(coords)} objects; pass one type per object.")
    if types.dtype.kind not in "iu" or (len(types) and (types.min() < 0 or types.max() >= n_types)):
        raise ValueError(f"types must be integers in [0, {n_types}) (n_types={n_types}).")
    return coords, types.astype(np.int64)


def neighbourhood_composition(
    coords: np.ndarray,
    types: np.ndarray,
    *,
    n_types: int,
    k: int | None = None,
    radius: float | None = None,
) -> np.ndarray:
    """Fraction of each type among every object's neighbours (the object itself left out).

    Parameters
    ----------
    coords
        (n_objects, 2 or 3) positions.
    types
        (n_objects,) int type of each object, in ``[0, n_types)``.
    n_types
        Number of types (columns of the result).
    k
        Neighbours are the ``k`` nearest objects (fewer when the well holds fewer).
    radius
        Neighbours are the objects within ``radius`` (inclusive, units of ``coords``). Give exactly one of
        ``k`` and ``radius``.

    Returns
    -------
    (n_objects, n_types) float array; each row sums to 1, or is NaN for an object without neighbours.

    """
    from scipy.spatial import cKDTree

    coords, types = _check_layout(coords, types, n_types)
    if (k is None) == (radius is None):
        raise ValueError(f"give exactly one of k and radius (got k={k!r}, radius={radius!r}).")
    n = len(coords)
    out = np.full((n, n_types), np.nan)
    if n < 2:
        return out
    tree = cKDTree(coords)
    if k is not None:
        if int(k) < 1:
            raise ValueError(f"k={k!r} must be >= 1.")
        kk = min(int(k), n - 1)
        _, idx = tree.query(coords, k=kk + 1)
        neighbours = types[np.asarray(idx)[:, 1:]]
        counts = np.stack([(neighbours == t).sum(1) for t in range(n_types)], axis=1).astype(np.float64)
    else:
        if not radius > 0:
            raise ValueError(f"radius={radius!r} must be > 0.")
        pairs = tree.query_pairs(float(radius), output_type="ndarray")
        counts = np.zeros((n, n_types))
        np.add.at(counts, (pairs[:, 0], types[pairs[:, 1]]), 1.0)
        np.add.at(counts, (pairs[:, 1], types[pairs[:, 0]]), 1.0)
    total = counts.sum(1, keepdims=True)
    ok = total[:, 0] > 0
    out[ok] = counts[ok] / total[ok]
    return out


def _assortativity(mixing: np.ndarray) -> float:
    """Newman's assortativity coefficient of a type-mixing matrix (fractions of edges, symmetric)."""
    e = mixing / mixing.sum()
    a = e.sum(1)
    expected = float((a * a).sum())
    if expected >= 1:
        return float("nan")
    return float((np.trace(e) - expected) / (1 - expected))


def arrangement_features(
    coords: np.ndarray,
    types: np.ndarray,
    *,
    n_types: int,
    k: int = 4,
    shells: Sequence[float] = DEFAULT_SHELLS,
    radial_bins: int = DEFAULT_RADIAL_BINS,
    centre: Sequence[float] | None = None,
) -> dict[str, float]:
    """Named per-well summary of how the types are arranged.

    With ``a`` and ``b`` type ids and ``d`` the well's median nearest-neighbour distance:

    ``nhood_k{k}:{a}>{b}``
        mean fraction of type ``b`` among the ``k`` nearest neighbours of the objects of type ``a``;
    ``homotypic_k{k}``, ``assortativity_k{k}``
        fraction of the ``k``-nearest-neighbour pairs that join objects of one type, and Newman's
        assortativity of that neighbour graph (0: random, 1: types apart, < 0: types alternate);
    ``cooc:{a}>{b}@{lo}-{hi}``
        co-occurrence ratio: the fraction of type ``b`` among the objects at distance ``(lo d, hi d]`` from
        the objects of type ``a``, divided by the fraction of ``b`` in the well (1: no preference);
    ``nn_dist:{a}>{b}``
        median distance (in ``d``) from the objects of type ``a`` to their nearest other object of type ``b``;
    ``radial_mean:{a}``, ``radial_sd:{a}``
        mean and standard deviation of the distance of type ``a`` to the well centre, divided by the mean
        distance of all objects (a ring of one type: small ``radial_sd``);
    ``radial_frac:{a}@q{i}``
        fraction of type ``a`` among the objects in the ``i``-th quantile bin of the distance to the well
        centre, divided by the fraction of ``a`` in the well (a ring: one bin enriched).

    Parameters
    ----------
    coords
        (n_objects, 2 or 3) positions.
    types
        (n_objects,) int type of each object, in ``[0, n_types)``.
    n_types
        Number of types.
    k
        Neighbours of the composition features.
    shells
        Increasing shell edges of the co-occurrence features, in units of ``d``.
    radial_bins
        Quantile bins of the distance to the centre for ``radial_frac`` (0: none).
    centre
        The well (field) centre; default the mean position of the objects.

    Returns
    -------
    Feature name -> value; NaN where a type is absent or has too few objects (e.g. one object has no
    other of its type).

    """
    from scipy.spatial import cKDTree

    coords, types = _check_layout(coords, types, n_types)
    shells = [float(s) for s in shells]
    if len(shells) < 2 or any(b <= a for a, b in zip(shells, shells[1:], strict=False)) or shells[0] < 0:
        raise ValueError(f"shells={shells!r} must be two or more increasing distances >= 0.")
    n = len(coords)
    out: dict[str, float] = {}
    ids = range(n_types)
    if n < 3:
        return out
    tree = cKDTree(coords)
    nn, _ = tree.query(coords, k=2)
    d = float(np.median(nn[:, 1]))
    d = d if d > 0 else 1.0
    frac = np.bincount(types, minlength=n_types) / n

    comp = neighbourhood_composition(coords, types, n_types=n_types, k=k)
    kk = min(int(k), n - 1)
    _, idx = tree.query(coords, k=kk + 1)
    mixing = np.zeros((n_types, n_types))
    np.add.at(mixing, (np.repeat(types, kk), types[np.asarray(idx)[:, 1:].ravel()]), 1.0)
    mixing = mixing + mixing.T
    out[f"homotypic_k{k}"] = float(np.trace(mixing) / mixing.sum())
    out[f"assortativity_k{k}"] = _assortativity(mixing)
    for a in ids:
        rows = comp[types == a]
        for b in ids:
            out[f"nhood_k{k}:{a}>{b}"] = float(np.nanmean(rows[:, b])) if len(rows) else float("nan")

    pairs = tree.sparse_distance_matrix(tree, shells[-1] * d, output_type="coo_matrix")
    keep = pairs.row != pairs.col
    src, dst, dist = types[pairs.row[keep]], types[pairs.col[keep]], pairs.data[keep] / d
    for lo, hi in zip(shells, shells[1:], strict=False):
        inside = (dist > lo) & (dist <= hi)
        counts = np.zeros((n_types, n_types))
        np.add.at(counts, (src[inside], dst[inside]), 1.0)
        totals = counts.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = (counts / totals) / frac[None, :]
        for a in ids:
            for b in ids:
                out[f"cooc:{a}>{b}@{lo:g}-{hi:g}"] = float(ratio[a, b]) if totals[a, 0] > 0 else float("nan")

    for b in ids:
        members = coords[types == b]
        if len(members) == 0:
            for a in ids:
                out[f"nn_dist:{a}>{b}"] = float("nan")
            continue
        sub = cKDTree(members)
        for a in ids:
            sources = coords[types == a]
            if len(sources) == 0 or (a == b and len(members) < 2):
                out[f"nn_dist:{a}>{b}"] = float("nan")
                continue
            dd, _ = sub.query(sources, k=2 if a == b else 1)
            dd = dd[:, 1] if a == b else dd
            out[f"nn_dist:{a}>{b}"] = float(np.median(dd) / d)

    centre_xy = np.mean(coords, axis=0) if centre is None else np.asarray(centre, dtype=np.float64)
    r = np.linalg.norm(coords - centre_xy, axis=1)
    scale = float(r.mean()) if r.mean() > 0 else 1.0
    for a in ids:
        ra = r[types == a] / scale
        out[f"radial_mean:{a}"] = float(ra.mean()) if len(ra) else float("nan")
        out[f"radial_sd:{a}"] = float(ra.std()) if len(ra) > 1 else float("nan")
    if radial_bins > 0:
        edges = np.quantile(r, np.linspace(0, 1, int(radial_bins) + 1)[1:-1])
        bins = np.searchsorted(edges, r, side="right")
        for i in range(int(radial_bins)):
            in_bin = types[bins == i]
            for a in ids:
                value = (in_bin == a).mean() / frac[a] if len(in_bin) and frac[a] > 0 else float("nan")
                out[f"radial_frac:{a}@q{i}"] = float(value)
    return out


def arrangement_table(
    coords: np.ndarray,
    types: np.ndarray,
    samples: Sequence[str] | np.ndarray,
    *,
    n_types: int,
    k: int = 4,
    shells: Sequence[float] = DEFAULT_SHELLS,
    radial_bins: int = DEFAULT_RADIAL_BINS,
    prefix: str = "arrangement:",
) -> pd.DataFrame:
    """:func:`arrangement_features` of every well (sample) of an object table.

    Parameters
    ----------
    coords
        (n_objects, 2 or 3) positions of all objects.
    types
        (n_objects,) int type of each object (:meth:`CellTypes.assign`).
    samples
        (n_objects,) well (sample) of each object.
    n_types
        Number of types.
    k, shells, radial_bins
        As in :func:`arrangement_features`.
    prefix
        Prepended to every feature name.

    Returns
    -------
    One row per sample (index ``sample``, sorted), one column per feature; NaN where a well lacks a type.

    """
    coords = np.asarray(coords, dtype=np.float64)
    samples = np.asarray(samples).astype(str)
    types = np.asarray(types)
    if samples.shape != (len(coords),):
        raise ValueError(f"samples has shape {samples.shape} for {len(coords)} objects; pass one per object.")
    rows = {}
    for sample in np.unique(samples):
        rows[sample] = arrangement_features(coords[samples == sample], types[samples == sample], n_types=n_types,
                                            k=k, shells=shells, radial_bins=radial_bins)
    frame = pd.DataFrame.from_dict(rows, orient="index").add_prefix(prefix)
    frame.index.name = "sample"
    return frame.sort_index()


def well_arrangement(
    values: np.ndarray,
    coords: np.ndarray,
    samples: Sequence[str] | np.ndarray,
    *,
    fit_samples: Sequence[str] | None = None,
    n_types: int = 3,
    seed: int = 0,
    prefix: str = "arrangement:",
) -> pd.DataFrame:
    """Type every object with types fitted on some wells, then :func:`arrangement_table` of every well.

    Parameters
    ----------
    values
        (n_objects, n_features) object features the types are fitted on (e.g. the CVAE latents).
    coords
        (n_objects, 2 or 3) positions.
    samples
        (n_objects,) well (sample) of each object.
    fit_samples
        Wells whose objects fit the types (the negative controls); default every well.
    n_types
        Number of cell types.
    seed
        Seed of the k-means fit.
    prefix
        Prepended to every feature name.

    Returns
    -------
    One row per sample (index ``sample``, sorted), one column per arrangement feature.

    """
    values = np.asarray(values, dtype=np.float64)
    samples = np.asarray(samples).astype(str)
    fit = np.ones(len(samples), bool) if fit_samples is None else np.isin(samples, [str(s) for s in fit_samples])
    if fit.sum() < n_types:
        logger.warning("%d objects in the fit wells, fewer than n_types=%d: fitting the types on every well",
                       int(fit.sum()), n_types)
        fit[:] = True
    types = fit_cell_types(values[fit], n_types=n_types, seed=seed).assign(values)
    return arrangement_table(coords, types, samples, n_types=n_types, prefix=prefix)
