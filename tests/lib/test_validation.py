from __future__ import annotations

import numpy as np
import pytest

from phenocoder_lib.validation import clustering_scores, treatment_scores


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
