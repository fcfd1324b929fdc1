"""Numba kernels over a :class:`~phenocoder_lib.radius_graph.GraphView` (``start``, ``degree``, ``indices``).

All kernels read the graph in spatial (graph) order. Parallel kernels split the nodes into
``n_chunks`` contiguous chunks with private accumulators, so results do not depend on the number
of threads except for floating-point summation order across chunks (the chunking is fixed by the
caller, so a given ``n_chunks`` is bit-reproducible).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..radius_graph import chunk_bounds as _bounds
from ..radius_graph import default_chunks  # noqa: F401  (the stats call it as K.default_chunks)


@njit(parallel=True, cache=True)
def label_pass(start, degree, indices, lab, k, p, n_chunks):
    """One pass over the edges with per-node neighbour-label counts ``m[c]``.

    Returns
    -------
    counts : (k, k) int64
        ``counts[a, b]`` = directed edges (i, j) with ``lab[i] = a``, ``lab[j] = b``.
    group_degree : (k,) int64
        Nodes outside cluster ``c`` with at least one neighbour in ``c``.
    moran_num : (k,) float64
        ``sum_i [d_i > 0] (m_ic / d_i - p_c) ([lab_i = c] - p_c)`` (Moran numerator, row-standardised).
    n_nonisolated : int64
        Nodes with at least one neighbour (= S0 of the row-standardised weights).
    t2 : int64
        ``sum_i d_i (d_i - 1)``.

    """
    n = start.shape[0]
    bounds = _bounds(n, n_chunks)
    cnt = np.zeros((n_chunks, k, k), dtype=np.int64)
    gdeg = np.zeros((n_chunks, k), dtype=np.int64)
    mnum = np.zeros((n_chunks, k), dtype=np.float64)
    nonis = np.zeros(n_chunks, dtype=np.int64)
    t2s = np.zeros(n_chunks, dtype=np.int64)
    for ch in prange(n_chunks):
        # private accumulators, written to the shared arrays once per chunk (no false sharing)
        m = np.zeros(k, dtype=np.int64)
        lc = np.zeros((k, k), dtype=np.int64)
        lg = np.zeros(k, dtype=np.int64)
        lm = np.zeros(k, dtype=np.float64)
        ln = 0
        lt = 0
        for i in range(bounds[ch], bounds[ch + 1]):
            d = degree[i]
            if d == 0:
                continue
            a = lab[i]
            s = start[i]
            for e in range(s, s + d):
                m[lab[indices[e]]] += 1
            ln += 1
            lt += d * (d - 1)
            inv = 1.0 / d
            for c in range(k):
                mc = m[c]
                if mc > 0:
                    lc[a, c] += mc
                    if c != a:
                        lg[c] += 1
                z = -p[c]
                if c == a:
                    z += 1.0
                lm[c] += (mc * inv - p[c]) * z
                m[c] = 0
        cnt[ch] = lc
        gdeg[ch] = lg
        mnum[ch] = lm
        nonis[ch] = ln
        t2s[ch] = lt
    return cnt.sum(axis=0), gdeg.sum(axis=0), mnum.sum(axis=0), nonis.sum(), t2s.sum()


@njit(parallel=True, cache=True)
def group_closeness_sums(start, degree, indices, lab, clusters):
    """Multi-source BFS from each cluster: sum of hop distances of the reached non-members."""
    n = start.shape[0]
    m = clusters.shape[0]
    sums = np.zeros(m, dtype=np.int64)
    for t in prange(m):
        c = clusters[t]
        dist = np.full(n, -1, dtype=np.int32)
        queue = np.empty(n, dtype=np.int32)
        tail = 0
        for v in range(n):
            if lab[v] == c:
                dist[v] = 0
                queue[tail] = v
                tail += 1
        head = 0
        total = 0
        while head < tail:
            v = queue[head]
            head += 1
            dv = dist[v] + 1
            s = start[v]
            for e in range(s, s + degree[v]):
                u = indices[e]
                if dist[u] < 0:
                    dist[u] = dv
                    total += dv
                    queue[tail] = u
                    tail += 1
        sums[t] = total
    return sums


@njit(parallel=True, cache=True)
def local_clustering(start, degree, indices, run_ends, nodes, n_chunks):
    """Local clustering coefficient ``2 T_v / (d_v (d_v - 1))`` (0 when ``d_v < 2``) of ``nodes``.

    ``run_ends[b, u]`` ends the ``b``-th id-sorted run of row ``u`` (the distance buckets of the
    graph). Each edge ``(u, w)`` among the neighbours of ``v`` is found once, from ``u`` with
    ``w > u`` (binary search in each run), which halves the scans of the marker method.
    """
    n = start.shape[0]
    m = nodes.shape[0]
    nb = run_ends.shape[0]
    out = np.zeros(m, dtype=np.float64)
    bounds = _bounds(m, n_chunks)
    for ch in prange(n_chunks):
        if bounds[ch] == bounds[ch + 1]:
            continue
        stamp = np.full(n, -1, dtype=np.int32)
        for t in range(bounds[ch], bounds[ch + 1]):
            v = nodes[t]
            d = degree[v]
            if d < 2:
                continue
            sv = start[v]
            for e in range(sv, sv + d):
                stamp[indices[e]] = v
            tri = 0
            for e in range(sv, sv + d):
                u = indices[e]
                su = start[u]
                prev = 0
                for b in range(nb):
                    lo = su + prev
                    hi = su + run_ends[b, u]
                    prev = run_ends[b, u]
                    while lo < hi:  # first entry > u
                        mid = (lo + hi) // 2
                        if indices[mid] <= u:
                            lo = mid + 1
                        else:
                            hi = mid
                    for f in range(lo, su + prev):
                        if stamp[indices[f]] == v:
                            tri += 1
            out[t] = 2.0 * tri / (d * (d - 1.0))
    return out


@njit(cache=True)
def _adjacent(start, indices, run_ends, a, b):
    """Whether ``b`` is in row ``a`` (binary search in each id-sorted run)."""
    sa = start[a]
    prev = 0
    for r in range(run_ends.shape[0]):
        lo = sa + prev
        hi = sa + run_ends[r, a]
        prev = run_ends[r, a]
        while lo < hi:
            mid = (lo + hi) // 2
            x = indices[mid]
            if x == b:
                return True
            if x < b:
                lo = mid + 1
            else:
                hi = mid
    return False


@njit(parallel=True, cache=True)
def sampled_local_clustering(start, degree, indices, run_ends, nodes, uniforms):
    """Unbiased estimate of each node's local clustering coefficient from neighbour pairs.

    For node ``v`` with ``P = d (d - 1) / 2`` neighbour pairs: if ``P <= q`` (``q = uniforms.shape[1]``)
    every pair is tested (exact); otherwise ``q`` pairs are drawn uniformly with replacement (from
    the pre-drawn ``uniforms``) and the fraction of connected pairs is returned.
    """
    m = nodes.shape[0]
    q = uniforms.shape[1]
    out = np.zeros(m, dtype=np.float64)
    for t in prange(m):
        v = nodes[t]
        d = degree[v]
        if d < 2:
            continue
        sv = start[v]
        npairs = d * (d - 1) // 2
        hits = 0
        if npairs <= q:
            for i in range(d):
                for j in range(i + 1, d):
                    if _adjacent(start, indices, run_ends, indices[sv + i], indices[sv + j]):
                        hits += 1
            out[t] = hits / npairs
        else:
            for s in range(q):
                i = int(uniforms[t, s, 0] * d)
                j = int(uniforms[t, s, 1] * (d - 1))
                if i >= d:
                    i = d - 1
                if j >= d - 1:
                    j = d - 2
                if j >= i:
                    j += 1
                if _adjacent(start, indices, run_ends, indices[sv + i], indices[sv + j]):
                    hits += 1
            out[t] = hits / q
    return out


@njit(cache=True)
def kcore(start, degree, indices, lab, same_label, kmin):
    """Membership of the ``kmin``-core (every node keeps >= ``kmin`` neighbours); order independent.

    With ``same_label`` only edges between nodes of the same label count (per-cluster cores).
    """
    n = start.shape[0]
    deg = np.zeros(n, dtype=np.int64)
    for v in range(n):
        s = start[v]
        if same_label:
            c = 0
            for e in range(s, s + degree[v]):
                if lab[indices[e]] == lab[v]:
                    c += 1
            deg[v] = c
        else:
            deg[v] = degree[v]
    alive = np.ones(n, dtype=np.bool_)
    queue = np.empty(n, dtype=np.int64)
    tail = 0
    for v in range(n):
        if deg[v] < kmin:
            alive[v] = False
            queue[tail] = v
            tail += 1
    head = 0
    while head < tail:
        v = queue[head]
        head += 1
        s = start[v]
        for e in range(s, s + degree[v]):
            u = indices[e]
            if not alive[u]:
                continue
            if same_label and lab[u] != lab[v]:
                continue
            deg[u] -= 1
            if deg[u] < kmin:
                alive[u] = False
                queue[tail] = u
                tail += 1
    return alive


@njit(cache=True)
def components(start, degree, indices, lab, same_label, alive):
    """Label the connected components of the alive nodes (BFS); ``-1`` for dead nodes."""
    n = start.shape[0]
    comp = np.full(n, -1, dtype=np.int64)
    queue = np.empty(n, dtype=np.int64)
    nc = 0
    for s0 in range(n):
        if not alive[s0] or comp[s0] >= 0:
            continue
        comp[s0] = nc
        queue[0] = s0
        head = 0
        tail = 1
        while head < tail:
            v = queue[head]
            head += 1
            s = start[v]
            for e in range(s, s + degree[v]):
                u = indices[e]
                if comp[u] >= 0 or not alive[u]:
                    continue
                if same_label and lab[u] != lab[v]:
                    continue
                comp[u] = nc
                queue[tail] = u
                tail += 1
        nc += 1
    return comp, nc


@njit(parallel=True, cache=True)
def moran_numerators(start, degree, indices, z, n_chunks):
    """``sum_i z_i . (mean of z over the neighbours of i)`` per column (row-standardised weights)."""
    n, f = z.shape
    bounds = _bounds(n, n_chunks)
    part = np.zeros((n_chunks, f), dtype=np.float64)
    for ch in prange(n_chunks):
        acc = np.zeros(f, dtype=np.float64)
        local = np.zeros(f, dtype=np.float64)
        for i in range(bounds[ch], bounds[ch + 1]):
            d = degree[i]
            if d == 0:
                continue
            for q in range(f):
                acc[q] = 0.0
            s = start[i]
            for e in range(s, s + d):
                j = indices[e]
                for q in range(f):
                    acc[q] += z[j, q]
            inv = 1.0 / d
            for q in range(f):
                local[q] += z[i, q] * acc[q] * inv
        part[ch] = local
    return part.sum(axis=0)
