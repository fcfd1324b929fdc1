"""validate --json end to end on a reduced screen (2 plates, 3 treatments, 2 epochs): the document and its figures."""

from __future__ import annotations

import json

import pytest

from phenocoder_lib.evaluation import json_safe
from phenocoder_lib.screen_evaluation import METRICS, REPRESENTATIONS, run_screen_validation

pytestmark = pytest.mark.slow


SETTINGS = {"seed": 0, "n_plates": 2, "nuclei_per_well": 40, "epochs": 2, "null_size": 1000,
            "treatments": ("morph_large", "texture_granular", "spatial_ring")}


@pytest.fixture(scope="module")
def screen_out(tmp_path_factory):
    return tmp_path_factory.mktemp("screen_validation")


@pytest.fixture(scope="module")
def doc(screen_out):
    return run_screen_validation(screen_out, **SETTINGS)


def test_a_rerun_with_the_same_settings_only_rescores_and_other_settings_get_their_own_folder(doc, screen_out):
    from phenocoder_lib.screen_evaluation import work_folder_name

    again = run_screen_validation(screen_out, **SETTINGS)
    assert "model" in doc["timings_s"] and "model" not in again["timings_s"]  # no second training
    assert again["representations"]["latents"]["map_activity"] == doc["representations"]["latents"]["map_activity"]
    (folder,) = [p.name for p in screen_out.iterdir()]
    assert folder.startswith("screen_s0_n40_")
    base = {"n_plates": 2, "nuclei_per_well": 40, "replicates": 2, "treatments": ["b", "a"], "epochs": 2,
            "patch_size": 16, "conv_layers": (32, 64), "n_latent_dim": 32, "radius": 30.0, "resolution": 0.02}
    same = {**base, "treatments": ("a", "b"), "conv_layers": [32, 64]}
    assert work_folder_name(0, **base) == work_folder_name(0, **same)
    for key, other in (("epochs", 3), ("nuclei_per_well", 41), ("radius", 31.0), ("treatments", ["a"])):
        assert work_folder_name(0, **base) != work_folder_name(0, **{**base, key: other}), key


def test_document_has_every_representation_and_metric(doc):
    assert list(doc["representations"]) == list(REPRESENTATIONS)
    for rep, scores in doc["representations"].items():
        for metric in ("map_activity", "fraction_retrieved_activity", "percent_replicating"):
            assert 0.0 <= scores[metric] <= 1.0, (rep, metric)
        assert set(METRICS) <= set(scores)
        assert set(scores["subsets"]) == {"morphology", "subtle", "spatial"}
        assert scores["n_wells"] == 2 * (6 + 3 * 2 * 2)
    assert [t["met"] in (True, False) for t in doc["targets"]] == [True] * 3
    json.dumps(json_safe(doc), allow_nan=False)  # strict JSON (consistency is NaN: one treatment per mechanism)


def test_baselines_retrieve_the_strong_morphology(doc):
    reps = doc["representations"]
    for rep in ("regionprops", "cellprofiler"):
        morph = reps[rep]["subsets"]["morphology"]
        assert morph["map_activity"] > morph["map_activity_chance"] + 0.2, (rep, morph)
    # a ring changes no cell: the per-cell regionprops table cannot retrieve it
    assert reps["regionprops"]["subsets"]["spatial"]["fraction_retrieved_activity"] == 0.0
