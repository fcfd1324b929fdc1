"""Spatial message passing: the mean of each object's latent over itself and its neighbours.

``m_i = (x_i + sum_{j in N_r(i)} x_j) / (|N_r(i)| + 1)`` where ``N_r(i)`` are the other objects of the
same sample within Euclidean distance ``<= r`` (inclusive). This is ``D^-1 (A + I) X`` with row
normalisation: every neighbour weighs the same, whatever its own degree. Sparse: the radius graph is
built per sample in spatial order (:mod:`phenocoder_lib.radius_graph`) and the mean is one numba
pass, float64 accumulation, float32 out.

It runs in the encoding stage (``encode(spatial_message_passing_radius=...)``), so it depends only
on the radius graph, never on the later spatial statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from .radius_graph import build_radius_graph, chunk_bounds, default_chunks
from .validation import check_positive

__all__ = ["spatial_message_passing"]


def spatial_message_passing(
    coords: np.ndarray,
    X: np.ndarray,
    radius: float,
    *,
    samples: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """Mean of ``X`` over each object and its neighbours within ``radius`` in the same sample.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates, ``d`` in 1..3 (one unit on every axis, e.g. um).
    X
        ``(n, f)`` values to average (e.g. latents); NaN propagates to every object that sees it.
    radius
        Inclusive Euclidean radius, ``>= 0``, in the units of ``coords``. ``0`` averages only objects
        at identical positions (so it returns ``X`` when positions are distinct).
    samples
        Optional ``(n,)`` sample labels; objects of different samples are never neighbours.

    Returns
    -------
    numpy.ndarray
        ``(n, f)`` float32, rows in the input order.

    """
    x = np.asarray(X)
    if x.ndim != 2:
        raise ValueError(f"X must be 2-D (n_objects, n_features), found shape {x.shape}.")
    pts = np.asarray(coords)
    if pts.ndim != 2 or pts.shape[0] != x.shape[0]:
        raise ValueError(f"coords must be (n_objects, n_dims) with n_objects = {x.shape[0]} (rows of X); "
                         f"found shape {pts.shape}.")
    check_positive(radius, argument="radius", allow_zero=True, unit="units of coords")
    r = float(radius)
    if x.dtype.kind not in "iufb":
        raise TypeError(f"X must be numeric, found dtype {x.dtype}.")
    out = np.empty(x.shape, dtype=np.float32)
    if x.shape[0] == 0:
        return out
    if samples is None:
        groups = [np.arange(x.shape[0])]
    else:
        labels = np.asarray(samples)
        if labels.shape != (x.shape[0],):
            raise ValueError(f"samples must have one label per object ({x.shape[0]}), found shape {labels.shape}.")
        codes, _ = _factorize(labels)
        order = np.argsort(codes, kind="stable")
        cuts = np.flatnonzero(np.diff(codes[order])) + 1
        groups = np.split(order, cuts)
    xf = x.astype(np.float64, copy=False)
    for rows in groups:
        graph = build_radius_graph(pts[rows], r)
        view = graph.view(r)
        xs = np.ascontiguousarray(xf[rows][graph.order])
        res = np.empty(xs.shape, dtype=np.float64)
        _neighbourhood_mean(view.start, view.degree, view.indices, xs, res, default_chunks(xs.shape[0]))
        out[rows[graph.order]] = res
    return out


def _factorize(labels: np.ndarray):
    import pandas as pd

    codes, uniques = pd.factorize(labels, use_na_sentinel=False)
    return codes, uniques


@njit(parallel=True, cache=True)
def _neighbourhood_mean(start, degree, indices, x, out, n_chunks):
    """``out[i] = (x[i] + sum of x over the neighbours of i) / (d_i + 1)``, float64 accumulation."""
    n, f = x.shape
    bounds = chunk_bounds(n, n_chunks)
    for ch in prange(n_chunks):
        acc = np.empty(f, dtype=np.float64)
        for i in range(bounds[ch], bounds[ch + 1]):
            for q in range(f):
                acc[q] = x[i, q]
            s = start[i]
            d = degree[i]
            for e in range(s, s + d):
                j = indices[e]
                for q in range(f):
                    acc[q] += x[j, q]
            inv = 1.0 / (d + 1.0)
            for q in range(f):
                out[i, q] = acc[q] * inv
