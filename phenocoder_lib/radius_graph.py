"""Radius graphs on 2-D/3-D object centroids, built once per sample in spatial order.

Infrastructure below every pipeline stage: the encoding's message passing
(:mod:`phenocoder_lib.message_passing`) and the spatial statistics (:mod:`phenocoder_lib.spatial`)
both build it.

The graph is the symmetric, unweighted radius graph of the objects: ``i`` and ``j`` (``i != j``) are
neighbours when their Euclidean distance is ``<= radius`` (inclusive); there are no self loops. It is
built with a uniform cell grid (cell side >= the largest radius) in two numba passes (count, fill)
and stored as int32 CSR indices in *spatial order*: graph node ``g`` is input row ``order[g]``, so
neighbours are close in memory and every later kernel streams through the indices.

Several radii are built at once. Within each row the neighbours are grouped by distance bucket
(``<= r_1``, ``(r_1, r_2]``, ...), each bucket sorted by node id, so the graph at a smaller radius
is the per-row *prefix* of the graph at the largest radius: ``indices[start[g] : start[g] +
n_within[k, g]]``. No second neighbour search, no distances stored, no extra copy.
Memory: ``4 E + 8 (n_radii + 2) n`` bytes for ``E`` directed edges at the largest radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

__all__ = [
    "GraphView",
    "RadiusGraph",
    "brute_force_neighbors",
    "build_radius_graph",
    "chunk_bounds",
    "default_chunks",
    "set_num_threads",
]


@dataclass(frozen=True)
class GraphView:
    """The radius graph at one radius, as per-row slices of a shared index array.

    Row ``g`` (graph order) holds ``indices[start[g] : start[g] + degree[g]]``.

    Parameters
    ----------
    radius
        The radius of this view.
    start
        ``(n,)`` int64 row starts into ``indices``.
    degree
        ``(n,)`` int64 neighbours per row at this radius.
    indices
        int32 neighbour node ids (graph order), shared with the largest radius.
    run_ends
        ``(k + 1, n)`` int64 ends of the id-sorted runs (distance buckets) of each row.

    """

    radius: float
    start: np.ndarray  # int64 (n,)
    degree: np.ndarray  # int64 (n,)
    indices: np.ndarray  # int32 (E_max,)
    run_ends: np.ndarray  # int64 (k + 1, n): ends of the id-sorted runs (distance buckets) per row

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.start.shape[0])

    @property
    def n_directed_edges(self) -> int:
        """Number of stored (directed) edges: twice the number of undirected edges."""
        return int(self.degree.sum())

    def neighbors(self, g: int) -> np.ndarray:
        """Return the neighbours of one graph node.

        Parameters
        ----------
        g
            Graph node id (graph order, not input row).

        Returns
        -------
        numpy.ndarray
            int32 graph ids of the neighbours, sorted within each distance bucket.

        """
        s = int(self.start[g])
        return self.indices[s : s + int(self.degree[g])]


@dataclass(frozen=True)
class RadiusGraph:
    """Radius graphs of one sample at several radii (see the module docstring).

    Parameters
    ----------
    radii
        Sorted, unique radii.
    order
        ``order[g]`` is the input row of graph node ``g`` (int64).
    indptr
        Row starts at the largest radius (int64, ``n + 1``).
    indices
        Neighbour node ids in graph order (int32).
    n_within
        ``n_within[k, g]``: number of neighbours of ``g`` within ``radii[k]`` (int64).
    coords
        Coordinates in graph order (float64, ``n x 3``; 2-D input gets a zero third column).
    n_dims
        Number of coordinate columns of the input (2 or 3; 1 is accepted too).

    """

    radii: tuple[float, ...]
    order: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    n_within: np.ndarray
    coords: np.ndarray
    n_dims: int

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.order.shape[0])

    def rank(self) -> np.ndarray:
        """Return the inverse of :attr:`order`.

        Returns
        -------
        numpy.ndarray
            ``rank[row]`` is the graph node of input row ``row`` (int64).

        """
        rank = np.empty_like(self.order)
        rank[self.order] = np.arange(self.order.shape[0], dtype=self.order.dtype)
        return rank

    def view(self, radius: float) -> GraphView:
        """Return the graph at one of :attr:`radii`.

        Parameters
        ----------
        radius
            One of :attr:`radii` (compared with a relative tolerance of ``1e-12``).

        Returns
        -------
        GraphView
            Per-row prefixes of the shared index array.

        Raises
        ------
        ValueError
            When the graph was not built at ``radius``.

        """
        k = _radius_index(self.radii, radius)
        return GraphView(float(self.radii[k]), self.indptr[:-1], self.n_within[k], self.indices,
                         self.n_within[: k + 1])

    def to_csr(self, radius: float, *, input_order: bool = True):
        """Return the graph at one radius as a sparse matrix, for tests and interoperability.

        Parameters
        ----------
        radius
            One of :attr:`radii`.
        input_order
            Rows and columns follow the input rows when True, the graph order otherwise.

        Returns
        -------
        scipy.sparse.csr_matrix
            ``(n, n)`` float32 matrix of ones, sorted indices.

        """
        import scipy.sparse as sp

        view = self.view(radius)
        n = self.n_nodes
        rows = np.repeat(np.arange(n, dtype=np.int64), view.degree)
        cols = _gather_prefix(view.start, view.degree, view.indices).astype(np.int64)
        if input_order:
            rows, cols = self.order[rows], self.order[cols]
        data = np.ones(rows.shape[0], dtype=np.float32)
        mat = sp.csr_matrix((data, (rows, cols)), shape=(n, n))
        mat.sort_indices()
        return mat


def _radius_index(radii: tuple[float, ...], radius: float) -> int:
    for k, r in enumerate(radii):
        if np.isclose(r, radius, rtol=1e-12, atol=0.0):
            return k
    raise ValueError(f"radius={radius!r} was not built; this graph has radii {list(radii)}.")


def _as_coords(coords: np.ndarray) -> np.ndarray:
    arr = np.asarray(coords)
    if arr.ndim != 2 or arr.shape[1] not in (1, 2, 3):
        raise ValueError(f"coords must have shape (n_objects, 1|2|3), found shape {arr.shape}.")
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"coords must be numeric, found dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("coords contain NaN or inf; drop or fix those objects first.")
    return arr


def _as_radii(radii) -> tuple[float, ...]:
    values = np.atleast_1d(np.asarray(radii, dtype=np.float64))
    if values.size == 0 or values.ndim != 1:
        raise ValueError(f"radii must be a number or a non-empty sequence of numbers, found {radii!r}.")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"radii must be finite numbers >= 0, found {list(values)}.")
    return tuple(float(r) for r in np.unique(values))


def build_radius_graph(coords: np.ndarray, radii) -> RadiusGraph:
    """Build the inclusive-Euclidean radius graph (no self loops) of ``coords`` at every radius.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates, ``d`` in 1..3, any numeric dtype (computed in float64).
    radii
        One radius or several (same units as ``coords``); the graph is built once, at the largest.

    Returns
    -------
    RadiusGraph
        The graph at every radius, nodes in spatial order.

    """
    xyz = _as_coords(coords)
    radii_t = _as_radii(radii)
    n, d = xyz.shape
    pts = np.zeros((n, 3), dtype=np.float64)
    pts[:, :d] = xyz
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return RadiusGraph(radii_t, empty, np.zeros(1, np.int64), np.zeros(0, np.int32),
                           np.zeros((len(radii_t), 0), np.int64), pts, d)
    if n >= np.iinfo(np.int32).max:
        raise ValueError(f"{n} objects exceed the int32 node ids of the graph; split the sample.")

    r_max = radii_t[-1]
    lo = pts.min(axis=0)
    extent = pts.max(axis=0) - lo
    # Cells of side r_max / 2: a neighbour lies at most two cells away per axis and, per point,
    # only the (x, y) columns that reach the ball and the z-cells within it are scanned (about
    # 3 candidate tests per neighbour). The side grows when the grid would have far more cells
    # than objects (sparse, spread-out data).
    side = max(0.5 * r_max, 1e-12 * max(float(extent.max()), 1.0), 1e-300)
    max_cells = max(4 * n, 4096)
    while True:
        dims = np.floor(extent / side).astype(np.int64) + 1
        if int(np.prod(dims.astype(np.float64))) <= max_cells:
            break
        side *= 2.0
    cell_xyz = np.minimum(np.floor((pts - lo) / side).astype(np.int64), dims - 1)
    cell = (cell_xyz[:, 0] * dims[1] + cell_xyz[:, 1]) * dims[2] + cell_xyz[:, 2]
    n_cells = int(np.prod(dims))
    order, cell_start = _counting_sort(cell, n_cells)
    pts_sorted = np.ascontiguousarray(pts[order])
    cell_sorted = cell[order]
    r2 = np.asarray(radii_t, dtype=np.float64) ** 2
    grid = np.array([lo[0], lo[1], lo[2], side], dtype=np.float64)
    dims_arr = dims.astype(np.int64)

    counts = np.zeros((n, len(radii_t)), dtype=np.int64)
    _scan(pts_sorted, cell_sorted, dims_arr, grid, cell_start, r2, counts, counts, np.zeros(0, np.int32), False)
    total = counts.sum(axis=1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(total, out=indptr[1:])
    offsets = np.empty_like(counts)
    offsets[:, 0] = indptr[:-1]
    if counts.shape[1] > 1:
        offsets[:, 1:] = indptr[:-1, None] + np.cumsum(counts[:, :-1], axis=1)
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    _scan(pts_sorted, cell_sorted, dims_arr, grid, cell_start, r2, counts, offsets, indices, True)
    n_within = np.ascontiguousarray(np.cumsum(counts, axis=1).T)
    return RadiusGraph(radii_t, order, indptr, indices, n_within, pts_sorted, d)


@njit(cache=True)
def _counting_sort(cell, n_cells):
    counts = np.zeros(n_cells + 1, dtype=np.int64)
    for c in cell:
        counts[c + 1] += 1
    for c in range(n_cells):
        counts[c + 1] += counts[c]
    cell_start = counts.copy()
    pos = counts[:-1].copy()
    order = np.empty(cell.shape[0], dtype=np.int64)
    for i in range(cell.shape[0]):
        c = cell[i]
        order[pos[c]] = i
        pos[c] += 1
    return order, cell_start


@njit(parallel=True, cache=True)
def _scan(pts, cell, dims, grid, cell_start, r2, counts, offsets, indices, fill):
    """Visit every candidate pair once per point; count per distance bucket, or write indices.

    Rows come out sorted by node id within each bucket: columns are visited in increasing cell id
    and the points are sorted by cell id.
    """
    n = pts.shape[0]
    nr = r2.shape[0]
    r2max = r2[nr - 1]
    nx, ny, nz = dims[0], dims[1], dims[2]
    lx, ly, lz, side = grid[0], grid[1], grid[2], grid[3]
    rmax = np.sqrt(r2max)
    reach = max(1, int(np.ceil(rmax / side)))
    for i in prange(n):
        c = cell[i]
        cz = c % nz
        t = c // nz
        cy = t % ny
        cx = t // ny
        xi, yi, zi = pts[i, 0], pts[i, 1], pts[i, 2]
        for ax in range(max(cx - reach, 0), min(cx + reach, nx - 1) + 1):
            # distance from the point to the slab of column x-index ax
            x_lo = lx + ax * side
            gx = 0.0
            if xi < x_lo:
                gx = x_lo - xi
            elif xi > x_lo + side:
                gx = xi - x_lo - side
            if ax == cx:
                gx = 0.0
            if gx * gx > r2max * (1.0 + 1e-12):
                continue
            for ay in range(max(cy - reach, 0), min(cy + reach, ny - 1) + 1):
                y_lo = ly + ay * side
                gy = 0.0
                if yi < y_lo:
                    gy = y_lo - yi
                elif yi > y_lo + side:
                    gy = yi - y_lo - side
                if ay == cy:
                    gy = 0.0
                rem2 = r2max - gx * gx - gy * gy
                if rem2 < -1e-12 * r2max:
                    continue
                rem2 = max(rem2, 0.0)
                # tiny margin: rounding must never drop a neighbour at the exact boundary
                rem = np.sqrt(rem2) * (1.0 + 1e-12) + 1e-12 * side
                z0 = int(np.floor((zi - rem - lz) / side))
                z1 = int(np.floor((zi + rem - lz) / side))
                z0 = max(z0, cz - reach, 0)
                z1 = min(z1, cz + reach, nz - 1)
                if z1 < z0:
                    continue
                base = (ax * ny + ay) * nz
                # the z-cells of one (x, y) column are contiguous in the sorted points
                for j in range(cell_start[base + z0], cell_start[base + z1 + 1]):
                    dx = pts[j, 0] - xi
                    dy = pts[j, 1] - yi
                    dz = pts[j, 2] - zi
                    d2 = dx * dx + dy * dy + dz * dz
                    if d2 <= r2max and j != i:
                        b = 0
                        while d2 > r2[b]:
                            b += 1
                        if fill:
                            indices[offsets[i, b]] = j
                            offsets[i, b] += 1
                        else:
                            counts[i, b] += 1


@njit(cache=True)
def _gather_prefix(start, degree, indices):
    total = 0
    for g in range(start.shape[0]):
        total += degree[g]
    out = np.empty(total, dtype=np.int32)
    pos = 0
    for g in range(start.shape[0]):
        s = start[g]
        for t in range(degree[g]):
            out[pos] = indices[s + t]
            pos += 1
    return out


def brute_force_neighbors(coords: np.ndarray, radius: float) -> list[np.ndarray]:
    """Return reference neighbour lists by an O(n^2) scan, for tests only.

    Parameters
    ----------
    coords
        ``(n, d)`` coordinates, ``d`` in 1..3.
    radius
        Inclusive Euclidean radius.

    Returns
    -------
    list of numpy.ndarray
        For each input row, the input rows of its neighbours (sorted, without the row itself).

    """
    xyz = _as_coords(coords)
    out = []
    for i in range(xyz.shape[0]):
        d2 = ((xyz - xyz[i]) ** 2).sum(axis=1)
        nb = np.flatnonzero(d2 <= radius * radius)
        out.append(nb[nb != i])
    return out


def default_chunks(n: int) -> int:
    """Return a fixed chunk count for the parallel graph kernels.

    The count does not depend on the number of threads, so floating-point sums over chunks are
    reproducible on any machine.

    Parameters
    ----------
    n
        Number of graph nodes.

    Returns
    -------
    int
        ``min(n, 64)``, at least 1.

    """
    return int(max(1, min(n, 64)))


@njit(cache=True)
def chunk_bounds(n, n_chunks):
    """Return the node bounds of ``n_chunks`` contiguous chunks of ``n`` nodes (numba-compiled).

    Parameters
    ----------
    n
        Number of graph nodes.
    n_chunks
        Number of chunks (see :func:`default_chunks`).

    Returns
    -------
    numpy.ndarray
        ``(n_chunks + 1,)`` int64; chunk ``c`` is ``bounds[c]:bounds[c + 1]``.

    """
    b = np.empty(n_chunks + 1, dtype=np.int64)
    for c in range(n_chunks + 1):
        b[c] = (n * c) // n_chunks
    return b


def set_num_threads(n_threads: int | None) -> int:
    """Set numba's thread count.

    Parameters
    ----------
    n_threads
        Threads to use, clipped to ``1..NUMBA_NUM_THREADS``; ``None`` means all configured threads.

    Returns
    -------
    int
        The previous thread count (pass it back to restore it).

    """
    previous = numba.get_num_threads()
    n = numba.config.NUMBA_NUM_THREADS if n_threads is None else max(1, min(int(n_threads),
                                                                            numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return previous
