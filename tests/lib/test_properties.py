"""Property-based tests (hypothesis) of the numeric cores.

Message passing, the spatial graph statistics, patch extraction and normalization, on small random
inputs: brute-force references, invariances (row order, translation, axis order), bounds and dtypes.
Complements the example-based tests (``test_message_passing``, ``test_spatial_stats``,
``test_patches``), which already check brute-force means, constants and the centre pixel.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from phenocoder_lib.patches import IntensityAccumulator, anchors_from, iter_patches, normalize, patch_windows
from phenocoder_lib.spatial import compute_spatial_stats, spatial_message_passing

FAST = settings(max_examples=25, deadline=None)


@st.composite
def point_sets(draw, max_n: int = 30, dims=(2, 3)):
    """Random points on an integer grid (exact distances), features, sample labels."""
    n = draw(st.integers(1, max_n))
    d = draw(st.sampled_from(dims))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    coords = rng.integers(0, 25, size=(n, d)).astype(np.float64)
    x = rng.normal(size=(n, draw(st.integers(1, 3))))
    samples = rng.integers(0, draw(st.integers(1, 3)), size=n)
    return coords, x, samples, rng


# --------------------------------------------------------------------------------------------------
# Message passing
# --------------------------------------------------------------------------------------------------


@FAST
@given(data=point_sets(), radius=st.floats(0, 12))
def test_message_passing_is_a_convex_combination(data, radius):
    coords, x, samples, _ = data
    out = spatial_message_passing(coords, x, radius, samples=samples)
    for s in np.unique(samples):  # within the sample's min and max, feature by feature
        rows = samples == s
        assert (out[rows] >= x[rows].min(axis=0) - 1e-5).all() and (out[rows] <= x[rows].max(axis=0) + 1e-5).all()


@FAST
@given(data=point_sets(), radius=st.floats(0, 12))
def test_message_passing_is_permutation_equivariant(data, radius):
    coords, x, samples, rng = data
    perm = rng.permutation(len(x))
    out = spatial_message_passing(coords, x, radius, samples=samples)
    shuffled = spatial_message_passing(coords[perm], x[perm], radius, samples=samples[perm])
    np.testing.assert_allclose(shuffled, out[perm], rtol=1e-5, atol=1e-6)


@FAST
@given(data=point_sets(), radius=st.floats(0, 12), shift=st.integers(-1000, 1000))
def test_message_passing_is_translation_and_axis_order_invariant(data, radius, shift):
    coords, x, samples, _ = data
    out = spatial_message_passing(coords, x, radius, samples=samples)
    moved = spatial_message_passing(coords[:, ::-1] + shift, x, radius, samples=samples)
    np.testing.assert_allclose(moved, out, rtol=1e-5, atol=1e-6)


@FAST
@given(data=point_sets())
def test_isolated_objects_keep_their_own_value(data):
    coords, x, samples, _ = data
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    radius = 2.5
    out = spatial_message_passing(coords, x, radius, samples=samples)
    same = samples[:, None] == samples[None]
    isolated = ~((dist <= radius) & same).any(axis=1)
    np.testing.assert_allclose(out[isolated], x[isolated].astype(np.float32), rtol=1e-6)


@FAST
@given(data=point_sets(max_n=20))
def test_other_samples_do_not_change_a_sample(data):
    coords, x, samples, _ = data
    alone = samples == samples[0]
    both = spatial_message_passing(coords, x, 8.0, samples=samples)
    single = spatial_message_passing(coords[alone], x[alone], 8.0)
    np.testing.assert_allclose(both[alone], single, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Spatial graph statistics
# --------------------------------------------------------------------------------------------------


@st.composite
def labelled_wells(draw):
    """One or two samples of 8-40 grid points with 2-3 clusters (every cluster present in every sample)."""
    n_clusters = draw(st.integers(2, 3))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(draw(st.integers(1, 2))):
        n = draw(st.integers(8, 40))
        labels = np.r_[np.arange(n_clusters), rng.integers(0, n_clusters, n - n_clusters)]
        coords = rng.integers(0, 30, size=(n, draw(st.sampled_from((2, 3))) if s == 0 else frames[0][1].shape[1]))
        frames.append((np.full(n, f"S{s}"), coords.astype(np.float64), labels))
    samples = np.concatenate([f[0] for f in frames])
    coords = np.concatenate([f[1] for f in frames])
    labels = np.concatenate([f[2] for f in frames]).astype(str)
    obs = pd.DataFrame(
        {"sample": samples, "leiden": pd.Categorical(labels, categories=[str(c) for c in range(n_clusters)])}
    )
    obs.index = [f"o{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=rng.normal(size=(len(obs), 2)).astype(np.float32), obs=obs)
    adata.obsm["spatial"] = coords
    return adata, rng


STATS = ["interactions", "connectivity", "centrality"]


def _stats(adata, radius=6.0):
    return compute_spatial_stats(
        adata,
        sample_key="sample",
        cluster_key="leiden",
        spatial_key="spatial",
        radii=(radius,),
        stats=STATS,
        exact=True,
        progress=False,
    ).to_df()


@FAST
@given(data=labelled_wells())
def test_counts_degrees_and_interactions_match_brute_force(data):
    adata, _ = data
    result = _stats(adata)
    r = "radius:6_stat:"
    for sample in result.index:
        rows = (adata.obs["sample"] == sample).to_numpy()
        pts, lab = adata.obsm["spatial"][rows], adata.obs["leiden"].cat.codes.to_numpy()[rows]
        adj = np.linalg.norm(pts[:, None] - pts[None], axis=-1) <= 6.0
        np.fill_diagonal(adj, False)
        deg = adj.sum(axis=1)
        row = result.loc[sample]
        assert row[f"{r}counts_total_objects"] == rows.sum()
        assert row[f"{r}counts_total_edges"] == adj.sum() / 2
        np.testing.assert_allclose(row[f"{r}connectivity_mean"], deg.mean())
        np.testing.assert_allclose(row[f"{r}connectivity_std"], deg.std())
        for a in range(len(adata.obs["leiden"].cat.categories)):
            np.testing.assert_allclose(row[f"{r}connectivity_degree_{a}_mean"], deg[lab == a].mean())
            for b in range(len(adata.obs["leiden"].cat.categories)):
                expected = adj[np.ix_(lab == a, lab == b)].sum()
                assert row[f"{r}interactions_interaction_{a}_{b}"] == expected


@FAST
@given(data=labelled_wells(), shift=st.integers(-500, 500))
def test_statistics_do_not_depend_on_row_order_translation_or_axis_order(data, shift):
    adata, rng = data
    base = _stats(adata)
    perm = rng.permutation(adata.n_obs)
    shuffled = adata[perm].copy()
    shuffled.obsm["spatial"] = shuffled.obsm["spatial"][:, ::-1] + shift
    other = _stats(shuffled)
    pd.testing.assert_frame_equal(other.loc[base.index], base, rtol=1e-9, atol=1e-9)


@FAST
@given(data=labelled_wells())
def test_relabelling_clusters_permutes_the_interaction_matrix(data):
    adata, _ = data
    k = len(adata.obs["leiden"].cat.categories)
    mapping = {str(c): str(k - 1 - c) for c in range(k)}  # reverse the cluster names
    renamed = adata.copy()
    renamed.obs["leiden"] = pd.Categorical(
        renamed.obs["leiden"].astype(str).map(mapping), categories=[str(c) for c in range(k)]
    )
    base, other = _stats(adata), _stats(renamed)
    r = "radius:6_stat:interactions_"
    for a in range(k):
        for b in range(k):
            for stat in ("interaction", "interaction_norm", "enrichment_zscore"):
                np.testing.assert_allclose(
                    other[f"{r}{stat}_{mapping[str(a)]}_{mapping[str(b)]}"],
                    base[f"{r}{stat}_{a}_{b}"],
                    rtol=1e-9,
                    atol=1e-9,
                )


# --------------------------------------------------------------------------------------------------
# Patch extraction
# --------------------------------------------------------------------------------------------------


@st.composite
def planes_and_objects(draw, dtypes=(np.uint8, np.uint16, np.float32)):
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    c, hgt, wid = draw(st.integers(1, 3)), draw(st.integers(1, 14)), draw(st.integers(1, 14))
    dtype = draw(st.sampled_from(dtypes))
    plane = (rng.random((c, hgt, wid)) * 200 + 3).astype(dtype)
    n = draw(st.integers(1, 6))
    ys, xs = rng.integers(0, hgt, n), rng.integers(0, wid, n)
    size = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    return plane, ys, xs, size


@FAST
@given(data=planes_and_objects())
def test_every_patch_is_a_slice_of_the_padded_plane(data):
    plane, ys, xs, (h, w) = data
    patches, padded = patch_windows(plane, ys, xs, (h, w))
    assert patches.shape == (len(ys), h, w, plane.shape[0]) and patches.dtype == plane.dtype
    fill = plane.reshape(plane.shape[0], -1).min(axis=1)
    top, left = h // 2, w // 2
    big = np.stack([np.pad(ch, ((top, h), (left, w)), constant_values=f) for ch, f in zip(plane, fill, strict=True)])
    for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
        np.testing.assert_array_equal(patches[i], big[:, y : y + h, x : x + w].transpose(1, 2, 0))
        inside = y - top >= 0 and x - left >= 0 and y - top + h <= plane.shape[1] and x - left + w <= plane.shape[2]
        assert padded[i] == (not inside)
        assert patches[i, top, left].tolist() == plane[:, y, x].tolist()  # the object sits at (h // 2, w // 2)


@FAST
@given(data=planes_and_objects(dtypes=(np.uint16,)), n_z=st.integers(1, 4), budget=st.sampled_from([1, 10**9]))
def test_3d_extraction_visits_each_object_once_with_its_own_plane(data, n_z, budget):
    plane, ys, xs, size = data
    rng = np.random.default_rng(int(ys.sum() + n_z))
    stack = np.stack([plane + k for k in range(n_z)], axis=1)  # (c, z, y, x); plane k is offset by k
    zs = rng.integers(0, n_z, len(ys))
    index = np.c_[ys, xs, zs]
    seen = []
    for pos, patches, padded in iter_patches(stack, index, size, True, max_bytes=budget):
        for p, patch, pad in zip(pos, patches, padded, strict=True):
            ref, ref_pad = patch_windows(stack[:, zs[p]], ys[[p]], xs[[p]], size)
            np.testing.assert_array_equal(patch, ref[0])
            assert pad == ref_pad[0]
            seen.append(int(p))
    assert sorted(seen) == list(range(len(ys)))


# --------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------


@st.composite
def raw_patches(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    top = {np.uint8: 255, np.uint16: 65535}.get(dtype, 1.0)
    scale = draw(st.floats(0.01, 1.0)) * top
    raw = (rng.random((draw(st.integers(1, 6)), 4, 5, draw(st.integers(1, 3)))) * scale).astype(dtype)
    return raw, draw(st.floats(0, 10))


@FAST
@given(data=raw_patches())
def test_normalization_range_dtype_and_monotonicity(data):
    raw, percentile = data
    acc = IntensityAccumulator(raw.shape[-1], np.float32 if raw.dtype == np.float64 else raw.dtype)
    acc.add(raw.astype(acc.dtype))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # constant channels warn (tested elsewhere)
        anchors = anchors_from(acc, percentile, [f"c{i}" for i in range(raw.shape[-1])], "test")
    low, high = np.array(anchors["low"]), np.array(anchors["high"])
    flat = raw.reshape(-1, raw.shape[-1]).astype(np.float64)
    assert (high > low).all()
    assert (low >= flat.min(axis=0) - 1e-6).all() and (low <= flat.max(axis=0) + 1e-6).all()
    out = normalize(raw, low, high)
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    for c in range(raw.shape[-1]):  # monotone: a brighter raw value never normalizes darker
        order = np.argsort(flat[:, c], kind="stable")
        assert (np.diff(out.reshape(-1, raw.shape[-1])[order, c]) >= 0).all()
    np.testing.assert_allclose(normalize(np.array([low]), low, high), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalize(np.array([high]), low, high), 1.0, atol=1e-5)


@FAST
@given(low=st.floats(-1e3, 1e3), width=st.floats(1e-2, 1e3), values=st.lists(st.floats(-1e4, 1e4), min_size=1))
def test_normalize_is_the_clipped_affine_map(low, width, values):
    raw = np.array(values, np.float64)[:, None]
    out = normalize(raw, [low], [low + width])
    expected = np.clip((raw - low) / width, 0, 1)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
