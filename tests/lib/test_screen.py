"""The multi-plate synthetic screen (planted effects), the CellProfiler baseline and the profile targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.cellprofiler import measure_objects, measure_plate
from phenocoder_lib.profiles import read_layout
from phenocoder_lib.screen_evaluation import check_targets
from phenocoder_lib.synthetic import SCREEN_TREATMENTS, make_synthetic_screen


@pytest.fixture(scope="session")
def screen(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen") / "s"
    return make_synthetic_screen(root, n_plates=2, n_controls=2, replicates=1, doses=(1.0,),
                                 image_size=160, nuclei_per_well=36, seed=5)


def _objects(screen, plate_root):
    tables = []
    for f in sorted((plate_root / "tables").glob("*.csv")):
        tables.append(pd.read_csv(f, dtype={"well": str}))
    obj = pd.concat(tables, ignore_index=True)
    truth = pd.read_csv(plate_root / "ground_truth" / "objects.csv", dtype={"well": str})
    layout = read_layout(plate_root)
    return obj.merge(truth, on=["well", "label"]).merge(layout, on="well")


def test_screen_layout_has_controls_replicates_and_mechanisms(screen):
    layout = screen.layout
    assert len(screen.plates) == 2 and len(layout) == 2 * (2 + len(SCREEN_TREATMENTS))
    per_plate = layout.groupby("plate")
    assert per_plate["control"].sum().tolist() == [2, 2]
    assert (layout[~layout["control"]].groupby(["treatment", "dose"]).size() == 2).all()  # one per plate
    for plate in screen.plates:
        assert {"imgs", "labels", "tables", "ground_truth"} <= {p.name for p in plate.iterdir()}
        assert (plate / "layout.csv").is_file() and (plate / "EXPORT_COMPLETE").is_file()
        assert set(read_layout(plate)["mechanism"]) >= {"nuclear_morphology", "aggregation"}


def test_every_well_has_the_same_type_mix(screen):
    obj = _objects(screen, screen.plates[0])
    counts = obj.groupby(["well", "cell_type"]).size().unstack()
    # equal thirds everywhere except the mixing lattice, which is only roughly equal
    fixed = counts.loc[obj.drop_duplicates("well").set_index("well")["treatment"].ne("spatial_mixing")
                       .reindex(counts.index)]
    assert (fixed.max(axis=1) - fixed.min(axis=1)).max() <= 1


def test_subtle_phenotypes_leave_mean_intensity_and_area_unchanged():
    from phenocoder_lib.synthetic import paint_screen_cell

    sig = np.array([0.8, 0.5])
    results = {}
    for name, speckle, lobes in (("plain", 0.0, 0.0), ("texture", 0.8, 0.0), ("shape", 0.0, 0.18)):
        image, labels = np.zeros((2, 41, 41), np.float32), np.zeros((41, 41), np.uint16)
        paint_screen_cell(image, labels, 1, 20.0, 20.0, 6.0, 1.3, 0.25, speckle, lobes, sig,
                          np.random.default_rng(0))
        inside = labels == 1
        results[name] = (inside.sum(), image[:, inside].mean(axis=1), image[0][inside].std())
    for name in ("plain", "texture", "shape"):
        np.testing.assert_allclose(results[name][1], sig * (1 - 0.25 / 2), rtol=1e-5)  # mean intensity kept
    assert abs(results["shape"][0] / results["plain"][0] - 1) < 0.05  # area kept by the lobes
    assert results["texture"][2] > 1.5 * results["plain"][2]  # but the texture is rougher


def test_strong_morphology_changes_the_area(screen):
    obj = _objects(screen, screen.plates[0])
    area = obj.groupby(["treatment", "cell_type"])["area"].median().unstack()
    assert (area.loc["morph_large"] / area.loc["DMSO"]).min() > 1.4  # radius x 1.3 -> area x ~1.7
    np.testing.assert_allclose(area.loc["spatial_ring"], area.loc["DMSO"], rtol=0.1)


def test_ring_puts_the_largest_type_on_a_circle(screen):
    obj = _objects(screen, screen.plates[0])
    obj["r"] = np.hypot(obj["centroid-0"] - 80, obj["centroid-1"] - 80)
    ring = obj[(obj["cell_type"] == "type_2")].groupby("treatment")["r"]
    assert ring.std()["spatial_ring"] < 0.5 * ring.std()["DMSO"]


def test_field_grows_with_the_nuclei_per_well_at_the_screens_density(tmp_path):
    from phenocoder_lib.synthetic import screen_image_size

    assert screen_image_size(90) == 256 and screen_image_size(360) == 512
    # 200 nuclei do not fit the 256 px lattice (about 144 positions): the default field must hold every one
    small = make_synthetic_screen(tmp_path / "big", n_plates=1, n_controls=2, replicates=1, doses=(1.0,),
                                  treatments=("spatial_ring",), nuclei_per_well=200, seed=1)
    obj = _objects(small, small.plates[0])
    assert obj.groupby("well").size().tolist() == [200, 200, 200]
    import imageio.v3 as iio

    label_file = next((small.plates[0] / "labels").glob("*.tif"))
    assert iio.imread(label_file).shape == (screen_image_size(200),) * 2


def test_screen_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="treatments=\\['nope'\\]"):
        make_synthetic_screen(tmp_path / "a", treatments=("nope",))
    with pytest.raises(ValueError, match="n_controls=1"):
        make_synthetic_screen(tmp_path / "b", n_controls=1)


def test_measure_objects_on_a_hand_made_field():
    labels = np.zeros((40, 40), np.uint16)
    labels[5:10, 5:10] = 3  # 5 x 5 square
    labels[20:30, 20:26] = 7  # 10 x 6 rectangle
    image = np.zeros((2, 40, 40), np.uint8)
    image[0][labels == 3] = 51  # 0.2 after scaling by 255
    image[0][labels == 7] = 102
    image[1][labels > 0] = 255
    df = measure_objects(image, labels, groups=("intensity", "sizeshape", "texture"), channel_names=["dna", "x"])
    assert df["label"].tolist() == [3, 7]
    np.testing.assert_allclose(df["sizeshape__Area"], [25, 60])
    np.testing.assert_allclose(df["intensity__Intensity_MeanIntensity__dna"], [0.2, 0.4], atol=1e-6)
    np.testing.assert_allclose(df["intensity__Intensity_MeanIntensity__x"], [1.0, 1.0])
    assert any(c.startswith("texture__") and c.endswith("__dna") for c in df.columns)
    with pytest.raises(ValueError, match="groups=\\['zernike'\\]"):
        measure_objects(image, labels, groups=("zernike",))
    with pytest.raises(ValueError, match="does not match"):
        measure_objects(image, labels[:30])


def test_measure_plate_lines_up_with_ingest_samples(screen):
    df = measure_plate(screen.plates[1], wells=["A01"], groups=("intensity", "sizeshape"))
    truth = pd.read_csv(screen.plates[1] / "ground_truth" / "objects.csv", dtype={"well": str})
    assert set(df["sample"]) == {f"{screen.plates[1].name}_A01"}
    assert sorted(df["label"]) == sorted(truth.loc[truth["well"] == "A01", "label"])


def test_check_targets_reads_the_scores():
    def rep(map_activity, spatial_fr, morph_map):
        return {"map_activity": map_activity, "subsets": {"spatial": {"fraction_retrieved_activity": spatial_fr},
                                                           "morphology": {"map_activity": morph_map}}}

    scores = {"latents": rep(0.6, 0.0, 0.9), "graph_stats": rep(0.5, 1.0, 0.5), "combined": rep(0.7, 1.0, 0.9),
              "regionprops": rep(0.5, 0.0, 0.9), "cellprofiler": rep(0.55, 0.1, 0.91)}
    targets = check_targets(scores)
    assert [t["met"] for t in targets] == [True, True, True]
    scores["cellprofiler"] = rep(0.8, 0.5, 0.99)
    assert [t["met"] for t in check_targets(scores)] == [False, False, False]
