"""Spatial message passing: mean over self and neighbours, per sample, sparse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from phenocoder_lib.spatial.message_passing import spatial_message_passing


def _brute(coords, x, radius, samples=None):
    d2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    a = d2 <= radius * radius
    if samples is not None:
        a &= samples[:, None] == samples[None, :]
    return (a.astype(float) @ x.astype(float)) / a.sum(axis=1, keepdims=True)


coords_st = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        arrays(np.float64, (n, 3), elements=st.floats(0, 50, allow_nan=False, width=32)),
        arrays(np.float32, (n, 4), elements=st.floats(-10, 10, allow_nan=False, width=32)),
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(data=coords_st, radius=st.floats(0, 30))
def test_matches_brute_force_mean(data, radius):
    coords, x, samples = data
    samples = np.array(samples)
    out = spatial_message_passing(coords, x, radius, samples=samples)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, _brute(coords, x, radius, samples), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=coords_st, radius=st.floats(0, 30), value=st.floats(-5, 5, width=32))
def test_constant_stays_constant(data, radius, value):
    coords, x, _ = data
    out = spatial_message_passing(coords, np.full_like(x, value), radius)
    np.testing.assert_allclose(out, value, rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_radius_zero_returns_x_for_distinct_points(n, seed):
    rng = np.random.default_rng(seed)
    coords = rng.permutation(1000)[:n, None] * np.array([[1.0, 0.5, 2.0]])  # distinct positions
    x = rng.normal(size=(n, 3)).astype(np.float32)
    np.testing.assert_array_equal(spatial_message_passing(coords, x, 0.0), x)


def test_samples_never_mix_and_2d_works():
    coords = np.zeros((4, 2))
    x = np.array([[1.0], [3.0], [10.0], [20.0]])
    out = spatial_message_passing(coords, x, 1.0, samples=np.array([1, 1, 2, 2]))
    np.testing.assert_allclose(out.ravel(), [2, 2, 15, 15])
    out = spatial_message_passing(coords, x, 1.0)
    np.testing.assert_allclose(out.ravel(), [8.5] * 4)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="radius"):
        spatial_message_passing(np.zeros((2, 3)), np.zeros((2, 1)), -1)
    with pytest.raises(ValueError, match="coords must be"):
        spatial_message_passing(np.zeros((3, 3)), np.zeros((2, 1)), 1)
    with pytest.raises(ValueError, match="samples must have one label"):
        spatial_message_passing(np.zeros((2, 3)), np.zeros((2, 1)), 1, samples=[1])


def test_message_passing_lives_below_the_spatial_statistics():
    """The encoding stage runs it, so it is its own module; the old spatial names stay importable."""
    import phenocoder_lib.message_passing as mp
    import phenocoder_lib.radius_graph as rg
    import phenocoder_lib.spatial as spatial
    import phenocoder_lib.spatial.graph as old_graph
    import phenocoder_lib.spatial.message_passing as old_mp

    assert old_mp.spatial_message_passing is mp.spatial_message_passing is spatial.spatial_message_passing
    assert old_graph.build_radius_graph is rg.build_radius_graph is spatial.build_radius_graph
