"""Radius graph: exact against brute force, several radii as prefixes, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from phenocoder_lib.spatial.graph import brute_force_neighbors, build_radius_graph


def _rows(csr, i):
    return csr.indices[csr.indptr[i]:csr.indptr[i + 1]]


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_matches_brute_force_at_every_radius(dims):
    rng = np.random.default_rng(dims)
    x = rng.uniform(0, 100, (400, dims))
    radii = (6.0, 11.0, 17.5)
    g = build_radius_graph(x, radii)
    for r in radii:
        csr = g.to_csr(r)
        ref = brute_force_neighbors(x, r)
        assert csr.nnz == sum(len(v) for v in ref)
        for i in range(x.shape[0]):
            np.testing.assert_array_equal(_rows(csr, i), ref[i])
        assert (csr != csr.T).nnz == 0  # symmetric
        assert csr.diagonal().sum() == 0  # no self loops


def test_inclusive_radius_with_ties_and_duplicates():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 40, (500, 3)).astype(float)  # many exact distances and duplicate points
    g = build_radius_graph(x, (0, 3, 5))
    for r in (0, 3, 5):
        csr = g.to_csr(r)
        ref = brute_force_neighbors(x, r)
        for i in range(x.shape[0]):
            np.testing.assert_array_equal(_rows(csr, i), ref[i])
    # two points exactly r apart are neighbours
    g = build_radius_graph(np.array([[0.0, 0.0], [25.0, 0.0], [50.1, 0.0]]), 25)
    np.testing.assert_array_equal(g.to_csr(25).toarray(), [[0, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_prefix_layout_and_order():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 50, (200, 3))
    g = build_radius_graph(x, (10, 5))  # unsorted input radii
    assert g.radii == (5.0, 10.0)
    assert g.indices.dtype == np.int32 and g.indptr.dtype == np.int64
    np.testing.assert_array_equal(np.sort(g.order), np.arange(200))
    np.testing.assert_array_equal(g.rank()[g.order], np.arange(200))
    small, large = g.view(5), g.view(10)
    assert (small.degree <= large.degree).all()
    np.testing.assert_array_equal(large.degree, np.diff(g.indptr))
    # the prefix of a row at the small radius is exactly its small-radius neighbourhood
    node = int(np.argmax(large.degree))
    d2 = ((g.coords[small.neighbors(node)] - g.coords[node]) ** 2).sum(axis=1)
    assert (d2 <= 25).all()
    with pytest.raises(ValueError, match="was not built"):
        g.view(7)


def test_empty_single_and_far_apart():
    g = build_radius_graph(np.zeros((0, 3)), 10)
    assert g.n_nodes == 0 and g.indices.size == 0
    g = build_radius_graph(np.array([[1.0, 2.0, 3.0]]), 10)
    assert g.view(10).degree.tolist() == [0]
    # huge extent relative to the radius: the grid is capped, still exact
    x = np.array([[0.0, 0.0, 0.0], [1e7, 0, 0], [1e7 + 1, 0, 0], [5e6, 5e6, 5e6]])
    csr = build_radius_graph(x, 2).to_csr(2)
    assert csr.nnz == 2 and csr[1, 2] == 1


def test_invalid_inputs():
    with pytest.raises(ValueError, match="coords must have shape"):
        build_radius_graph(np.zeros((5, 4)), 1)
    with pytest.raises(ValueError, match="NaN"):
        build_radius_graph(np.array([[0.0, np.nan]]), 1)
    with pytest.raises(ValueError, match="radii must be finite"):
        build_radius_graph(np.zeros((3, 2)), -1)
