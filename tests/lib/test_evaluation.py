from __future__ import annotations

import numpy as np
import pytest

from phenocoder_lib.evaluation import clustering_scores, json_safe, treatment_scores


def test_clustering_scores_perfect_and_random():
    truth = np.repeat(["a", "b", "c"], 50)
    relabelled = np.repeat([2, 0, 1], 50)
    assert clustering_scores(truth, relabelled) == {"ari": 1.0, "nmi": 1.0, "n_clusters": 3}
    rng = np.random.default_rng(0)
    noise = clustering_scores(truth, rng.integers(0, 3, size=150))
    assert abs(noise["ari"]) < 0.1
    with pytest.raises(ValueError, match="same length"):
        clustering_scores(truth, relabelled[:10])


def test_treatment_scores():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 0.1, (6, 3)), rng.normal(5, 0.1, (6, 3))])
    y = np.repeat(["control", "treated"], 6)
    scores = treatment_scores(x, y)
    assert scores["loo_knn_accuracy"] == 1.0 and scores["silhouette"] > 0.9
    with pytest.raises(ValueError, match="two treatments"):
        treatment_scores(x, np.repeat("control", 12))


def test_json_safe_gives_strict_json():
    import json

    doc = {"a": np.float32(0.5), 3: [np.int64(2), float("nan"), (np.inf, -np.inf)], "b": {"c": np.bool_(True)}}
    safe = json_safe(doc)
    assert safe == {"a": 0.5, "3": [2, None, [None, None]], "b": {"c": True}}
    assert type(safe["a"]) is float and type(safe["3"][0]) is int and type(safe["b"]["c"]) is bool
    assert json.loads(json.dumps(safe, allow_nan=False)) == safe


def test_planted_truth_metrics_scores_a_run_and_is_none_without_truth(tmp_path):
    import pandas as pd

    from phenocoder_lib.evaluation import has_ground_truth, planted_truth_metrics
    from phenocoder_lib.synthetic import make_synthetic_plate, read_ground_truth

    plate = make_synthetic_plate(tmp_path / "p", n_wells=4, ndim=2, image_size=64, nuclei_per_well=12, seed=1)
    objects, _ = read_ground_truth(plate.root)
    wells = {f"S_{w}": (plate.root, w) for w in plate.wells}
    perfect = pd.DataFrame({"sample": "S_" + objects["well"], "label": objects["label"],
                            "cluster": objects["cell_type"].map({t: str(i) for i, t in enumerate(plate.cell_types)})})
    # embedding: 1-D coordinate = treatment index (control 0, treated 10) -> perfect separation
    samples = list(wells)
    emb = np.array([[0.0 if plate.treatments[w] == "control" else 10.0] for w in plate.wells])
    emb += np.arange(len(samples))[:, None] * 0.01
    m = planted_truth_metrics(wells, embedding=emb, samples=samples, object_labels=perfect)
    assert m["cell_type_ari"] == 1.0 and m["cell_type_nmi"] == 1.0 and m["n_objects"] == len(objects)
    assert m["treatment_loo_knn_accuracy"] == 1.0 and m["treatment_silhouette"] > 0.9
    assert m["n_samples_with_truth"] == 4
    # labels that ignore the truth score near zero; objects of unknown samples are ignored
    shuffled = perfect.assign(cluster=np.random.default_rng(0).permutation(perfect["cluster"].to_numpy()))
    extra = pd.DataFrame({"sample": ["other"], "label": [1], "cluster": ["9"]})
    m = planted_truth_metrics(wells, object_labels=pd.concat([shuffled, extra]))
    assert m["cell_type_ari"] < 0.3 and "treatment_silhouette" not in m
    # no ground truth folder: None (a real plate)
    assert has_ground_truth(plate.root)
    bare = tmp_path / "real_plate"
    bare.mkdir()
    assert not has_ground_truth(bare)
    assert planted_truth_metrics({"S_A01": (bare, "A01")}, embedding=emb[:1], samples=["S_A01"]) is None


def test_check_targets_and_report():
    import pandas as pd

    from phenocoder_lib.evaluation import check_targets, format_report

    result = pd.DataFrame([
        {"what": "cell types", "representation": "latents", "ari": 0.9, "nmi": 0.9, "n_clusters": 3},
        {"what": "cell types", "representation": "feature_table_baseline (intensities)", "ari": 0.95, "nmi": 0.9,
         "n_clusters": 3},
        {"what": "treatments", "representation": "all spatial statistics", "silhouette": 0.3,
         "loo_knn_accuracy": 1.0},
    ])
    targets = check_targets(result).set_index("target")["met"]
    assert targets["latent clusters ARI >= 0.8"]
    assert targets["leave-one-out treatment accuracy >= 0.95"]
    assert not targets["latent clusters ARI > feature-table baseline ARI"]
    text = format_report(result, check_targets(result))
    assert "Targets:" in text and "latents" in text


@pytest.mark.slow
def test_evaluation_recovers_planted_types_and_treatments(tmp_path):
    """A real (reduced) run: 6 wells per treatment, 100 nuclei per well, 8 epochs (~2 min on 2 cores).

    At these settings the issue's targets hold: latent clusters ARI >= 0.8 and above the feature-table
    baseline; leave-one-out treatment accuracy >= 0.95 on the well embedding of all statistics.
    """
    from phenocoder_lib.evaluation import check_targets, format_report, run_evaluation

    result = run_evaluation(tmp_path, wells_per_treatment=6, nuclei_per_well=100, epochs=8, seed=0)
    report = format_report(result, targets := check_targets(result))
    cells = result[result["what"] == "cell types"].set_index("representation")
    treat = result[result["what"] == "treatments"].set_index("representation")
    assert cells.loc["latents", "ari"] >= 0.8 and cells.loc["latents", "nmi"] >= 0.8, report
    baselines = [r for r in cells.index if r.startswith("feature_table_baseline")]
    assert len(baselines) == 2 and (cells.loc[baselines, "ari"] < cells.loc["latents", "ari"]).all(), report
    assert cells["ari_best_of_sweep"].ge(cells["ari"]).all()
    assert treat.loc["all spatial statistics", "loo_knn_accuracy"] >= 0.95, report
    assert treat.loc["all spatial statistics", "n_wells"] >= 11, report
    assert {"interactions only", "cluster composition only (no spatial statistics)"} <= set(treat.index)
    assert targets["met"].all(), report
