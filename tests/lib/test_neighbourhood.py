"""Neighbourhood composition and per-well arrangement features on small hand-made layouts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.spatial.neighbourhood import (
    arrangement_features,
    arrangement_table,
    fit_cell_types,
    neighbourhood_composition,
    well_arrangement,
)

LINE = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])
ALTERNATING = np.array([0, 1, 0, 1])


def _checkerboard(n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.stack([ii.ravel(), jj.ravel()], 1).astype(float), ((ii + jj) % 2).ravel()


def test_composition_of_the_k_nearest_neighbours():
    comp = neighbourhood_composition(LINE, ALTERNATING, n_types=2, k=2)
    # ends: one neighbour of each type at distances 1 and 2; inner objects: both neighbours of the other type
    np.testing.assert_allclose(comp, [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])


def test_composition_within_a_radius_and_an_isolated_object():
    comp = neighbourhood_composition(LINE, ALTERNATING, n_types=2, radius=1.0)
    np.testing.assert_allclose(comp, [[0, 1], [1, 0], [0, 1], [1, 0]])
    lonely = neighbourhood_composition(np.array([[0.0, 0.0], [10.0, 0.0]]), np.array([0, 1]), n_types=2,
                                       radius=1.0)
    assert np.isnan(lonely).all()


def test_composition_refuses_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of k and radius"):
        neighbourhood_composition(LINE, ALTERNATING, n_types=2)
    with pytest.raises(ValueError, match="integers in"):
        neighbourhood_composition(LINE, ALTERNATING, n_types=1, k=1)


def test_checkerboard_cooccurrence_and_nearest_distances():
    coords, types = _checkerboard()
    f = arrangement_features(coords, types, n_types=2, radial_bins=0)
    # first shell (4-neighbours): always the other type; second shell (diagonals): always the same type
    assert f["cooc:0>0@0-1.25"] == 0.0 and f["cooc:0>1@0-1.25"] == pytest.approx(2.0)
    assert f["cooc:1>1@1.25-1.75"] == pytest.approx(2.0) and f["cooc:1>0@1.25-1.75"] == 0.0
    assert f["nn_dist:0>0"] == pytest.approx(np.sqrt(2)) and f["nn_dist:0>1"] == pytest.approx(1.0)
    # both types have the same distances to the centre
    assert f["radial_mean:0"] == pytest.approx(1.0) and f["radial_mean:1"] == pytest.approx(1.0)
    assert not any(name.startswith("radial_frac") for name in f)


def test_patches_are_assortative_and_alternation_is_not():
    coords, _ = _checkerboard(6)
    halves = (coords[:, 1] >= 3).astype(int)  # left half type 0, right half type 1
    line = np.array([[0.0, float(i)] for i in range(12)])
    patches = arrangement_features(coords, halves, n_types=2, k=2)
    alternating = arrangement_features(line, np.arange(12) % 2, n_types=2, k=2)
    assert patches["homotypic_k2"] > 0.8 and patches["assortativity_k2"] > 0.6
    # on a line every object's two nearest neighbours are of the other type, the ends' second one excepted
    assert alternating["homotypic_k2"] == pytest.approx(2 / 24)
    assert alternating["assortativity_k2"] < -0.8
    assert alternating["nhood_k2:0>1"] == pytest.approx(1 - 1 / 12)


def test_a_ring_of_one_type_has_no_radial_spread_and_fills_the_outer_bin():
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    outer = 5 * np.stack([np.cos(angles), np.sin(angles)], 1)
    inner = 1 * np.stack([np.cos(angles + 0.2), np.sin(angles + 0.2)], 1)
    coords = np.vstack([inner, outer])
    types = np.repeat([0, 1], 8)
    f = arrangement_features(coords, types, n_types=2, radial_bins=2, centre=(0.0, 0.0))
    assert f["radial_mean:1"] == pytest.approx(5 / 3) and f["radial_sd:1"] == pytest.approx(0.0, abs=1e-12)
    assert f["radial_frac:1@q1"] == pytest.approx(2.0) and f["radial_frac:0@q1"] == pytest.approx(0.0)


def test_types_fitted_on_controls_are_ordered_by_size_and_assign_new_objects():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [30, 20, 10]
    values = np.vstack([c + rng.normal(0, 0.5, (n, 2)) for c, n in zip(centres, sizes, strict=True)])
    types = fit_cell_types(values, n_types=3, seed=0)
    np.testing.assert_array_equal(types.assign(centres), [0, 1, 2])
    assert types.n_types == 3
    with pytest.raises(ValueError, match="n_types"):
        fit_cell_types(values[:2], n_types=3)


def test_well_arrangement_has_one_row_per_well_and_types_from_the_fit_wells():
    coords, checker = _checkerboard()
    # latents that separate the two checkerboard types; well B holds the same cells sorted into two halves
    values = np.where(checker[:, None] == 1, 5.0, 0.0) * np.ones((1, 3))
    halves = (coords[:, 1] >= 2).astype(int)
    values_b = np.where(halves[:, None] == 1, 5.0, 0.0) * np.ones((1, 3))
    frame = well_arrangement(np.vstack([values, values_b]), np.vstack([coords, coords]),
                             np.repeat(["A", "B"], 16), fit_samples=["A"], n_types=2)
    assert list(frame.index) == ["A", "B"] and frame.index.name == "sample"
    assert frame.loc["A", "arrangement:cooc:0>0@0-1.25"] == 0.0
    assert frame.loc["B", "arrangement:cooc:0>0@0-1.25"] > 1.5
    table = arrangement_table(coords, checker, np.array(["W"] * 16), n_types=2, prefix="x:")
    assert isinstance(table, pd.DataFrame) and all(c.startswith("x:") for c in table.columns)


def test_build_representations_puts_the_arrangement_into_the_graph_block():
    from phenocoder_lib.screen_evaluation import build_representations

    rng = np.random.default_rng(0)
    wells = [f"A{i:02d}" for i in range(1, 9)]
    samples = pd.DataFrame([{"sample": f"P{p}_{w}", "plate": f"P{p}", "well": w} for p in (1, 2) for w in wells])
    layout = pd.concat([pd.DataFrame({"plate": f"P{p}", "well": wells, "treatment": ["DMSO"] * 4 + ["t"] * 4,
                                      "dose": [0.0] * 4 + [1.0] * 4, "control": [True] * 4 + [False] * 4})
                        for p in (1, 2)], ignore_index=True)
    index = pd.Index(samples["sample"], name="sample")
    raw = {"latents": pd.DataFrame(rng.normal(size=(16, 4)), index=index).add_prefix("latent:"),
           "graph_stats": pd.DataFrame(rng.normal(size=(16, 2)), index=index,
                                       columns=["r30_stat:interactions_a", "r30_stat:degree_b"]),
           "arrangement": pd.DataFrame(rng.normal(size=(16, 3)), index=index).add_prefix("arrangement:")}
    out = build_representations(raw, samples, layout, sphere=False)
    assert set(out) == {"latents", "graph_stats", "combined"}
    graph = out["graph_stats"]
    # interactions kept, other statistic groups dropped, arrangement joined; the block is sphered on controls
    assert "r30_stat:interactions_a" in graph.features and "r30_stat:degree_b" not in graph.features
    assert sum(f.startswith("arrangement:") for f in graph.features) == 3
    assert graph.steps[-1]["step"].startswith("spherize")
    assert not out["latents"].steps[-1]["step"].startswith("spherize")
