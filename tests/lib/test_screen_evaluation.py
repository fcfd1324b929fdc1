"""validate --json end to end on a reduced screen (2 plates, 3 treatments, 2 epochs): the document and its figures."""

from __future__ import annotations

import json

import pytest

from phenocoder_lib.evaluation import json_safe
from phenocoder_lib.screen_evaluation import METRICS, REPRESENTATIONS, run_screen_validation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("screen_validation")
    return run_screen_validation(out, seed=0, n_plates=2, nuclei_per_well=40, epochs=2, null_size=1000,
                                 treatments=("morph_large", "texture_granular", "spatial_ring"))


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
