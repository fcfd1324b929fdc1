"""Partition a sample into cubes ("subunits") on a grid whose origin is shared by every sample.

A cube is ``floor((position - origin) / dim_subunit)`` per axis. The origin defaults to the origin
of the coordinate system (all zeros), so the same cube key means the same region in every well and
in every later run (it does not move with each sample's minimum).
Cubes do not overlap; graphs are built inside a cube, so objects near its faces lose neighbours
outside it. Subsampling of large cubes is seeded by ``(seed, sample, cube key)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..validation import check_int

__all__ = ["Subunit", "normalize_dim_subunit", "partition_subunits", "subunit_indices"]


@dataclass(frozen=True)
class Subunit:
    """One cube of one sample.

    Parameters
    ----------
    key
        Grid index per axis (``(iy, ix[, iz])`` for coordinates ``(y, x[, z])``).
    id
        Enumeration of the non-empty cubes of the sample in sorted key order (stable under
        ``min_obs``/``max_obs`` changes).
    rows
        Positions (into the sample's objects) of the objects used, sorted.
    n_total
        Objects in the cube before subsampling.

    """

    key: tuple[int, ...]
    id: int
    rows: np.ndarray
    n_total: int

    @property
    def key_str(self) -> str:
        """The grid key as text, e.g. ``'(0, 1, 2)'`` (``obs['subunit_key']``)."""
        return str(tuple(int(v) for v in self.key))


def normalize_dim_subunit(dim_subunit: float | Sequence[float], n_dims: int) -> np.ndarray:
    """Return the cube edge per axis: a scalar is broadcast; 3 values with 2-D coordinates use the first 2.

    Parameters
    ----------
    dim_subunit
        One edge, or one per axis.
    n_dims
        Number of coordinate axes.

    Returns
    -------
    numpy.ndarray
        ``(n_dims,)`` float64 edges.

    Raises
    ------
    ValueError
        For another number of values, or edges that are not positive and finite.

    """
    dims = np.atleast_1d(np.asarray(dim_subunit, dtype=np.float64))
    if dims.ndim != 1 or dims.size not in (1, n_dims, 3) or (dims.size == 3 and n_dims not in (2, 3)):
        raise ValueError(f"dim_subunit={dim_subunit!r} must be a number or one edge per axis "
                         f"({n_dims} values for {n_dims}-D coordinates).")
    if dims.size == 1:
        dims = np.repeat(dims, n_dims)
    dims = dims[:n_dims]
    if not np.isfinite(dims).all() or (dims <= 0).any():
        raise ValueError(f"dim_subunit={dim_subunit!r} must be positive and finite.")
    return dims


def subunit_indices(coords: np.ndarray, dim_subunit: float | Sequence[float],
                    origin: Sequence[float] | None = None) -> np.ndarray:
    """Return the integer cube index per object and axis, ``floor((coords - origin) / dim_subunit)``.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates.
    dim_subunit
        Cube edge (one, or one per axis).
    origin
        Grid origin, one value per axis (default: all zeros).

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` int64 cube indices.

    """
    coords = np.asarray(coords, dtype=np.float64)
    dims = normalize_dim_subunit(dim_subunit, coords.shape[1])
    org = np.zeros(coords.shape[1]) if origin is None else np.asarray(origin, dtype=np.float64)
    if org.shape != (coords.shape[1],):
        raise ValueError(f"subunit_origin={origin!r} must have one value per coordinate axis "
                         f"({coords.shape[1]}).")
    return np.floor((coords - org) / dims).astype(np.int64)


def partition_subunits(
    coords: np.ndarray,
    dim_subunit: float | Sequence[float],
    *,
    origin: Sequence[float] | None = None,
    min_obs: int = 1,
    max_obs: int | None = None,
    seed: int = 0,
    seed_key: Sequence[int] = (),
) -> tuple[list[Subunit], int]:
    """Return the cubes of one sample with at least ``min_obs`` objects, each subsampled to ``max_obs``.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates of the sample's objects.
    dim_subunit
        Cube edge (one, or one per axis).
    origin
        Grid origin, one value per axis (default: all zeros, shared by every sample).
    min_obs
        Cubes with fewer objects are dropped.
    max_obs
        Larger cubes are subsampled to this many objects; ``None`` keeps all.
    seed
        Seed of the subsampling.
    seed_key
        Non-negative ints mixed into the seed (e.g. the sample key), so a cube's sample does not
        depend on the other samples.

    Returns
    -------
    (subunits, n_filtered)
        Kept cubes in key order, and how many non-empty cubes had fewer than ``min_obs`` objects.

    """
    if max_obs is not None:
        check_int(max_obs, argument="max_obs_per_subunit", minimum=1, expected="None or a positive int")
    idx = subunit_indices(coords, dim_subunit, origin)
    if idx.shape[0] == 0:
        return [], 0
    keys, inverse, sizes = np.unique(idx, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out: list[Subunit] = []
    n_filtered = 0
    for cid in range(keys.shape[0]):
        rows = order[bounds[cid]:bounds[cid + 1]]
        key = tuple(int(v) for v in keys[cid])
        if rows.shape[0] < min_obs:
            n_filtered += 1
            continue
        n_total = int(rows.shape[0])
        if max_obs is not None and n_total > int(max_obs):
            # seeded by (seed, sample key, cube key): independent of the other cubes and samples
            key_u = [int(v) + (1 << 31) for v in key]
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, seed_key), *key_u]))
            rows = np.sort(rng.choice(rows, size=int(max_obs), replace=False))
        out.append(Subunit(key=key, id=cid, rows=rows, n_total=n_total))
    return out, n_filtered
