"""Retrieval mAP (copairs), consistency and percent replicating on hand-made profiles with known answers."""

import numpy as np
import pandas as pd
import pytest

from phenocoder_lib.profiles import WellProfiles
from phenocoder_lib.retrieval import (
    consensus_profiles,
    evaluate_profiles,
    percent_replicating,
    phenotypic_activity,
    phenotypic_consistency,
)

FEATURES = ["f0", "f1", "f2", "f3"]


def _profiles(rows):
    data = pd.DataFrame(rows, columns=["sample", "plate", "well", "treatment", "dose", "control", "mechanism",
                                       *FEATURES])
    return WellProfiles(data, FEATURES, "hand-made")


def _hand_made():
    e = np.eye(4)
    rows = []
    # controls: two per plate, along f2/f3 (orthogonal to the treatments)
    for p in ("P1", "P2"):
        rows.append([f"{p}_C1", p, "C1", "DMSO", 0.0, True, "", *e[2]])
        rows.append([f"{p}_C2", p, "C2", "DMSO", 0.0, True, "", *e[3]])
    # A: every replicate along f0 -> its replicates rank first: AP 1
    rows += [[f"{p}_A", p, "A", "A", 1.0, False, "m1", *(e[0] + 0.01 * e[1])] for p in ("P1", "P2")]
    # B: each replicate is closer to its plate's f2 control (cos 0.67) than to the other replicate (cos 0.45): AP 1/2
    rows.append(["P1_B", "P1", "B", "B", 1.0, False, "m2", *np.array([0, 1, 0.9, 0])])
    rows.append(["P2_B", "P2", "B", "B", 1.0, False, "m2", *np.array([0, 0, 0.9, -1.0])])
    return _profiles(rows)


def test_activity_map_matches_hand_computed_values():
    result = phenotypic_activity(_hand_made(), null_size=2000, seed=0)
    per = result.per_group.set_index("treatment")
    assert per.loc["A", "mean_average_precision"] == pytest.approx(1.0)
    assert per.loc["B", "mean_average_precision"] == pytest.approx(0.5)
    # 1 positive among 1 positive + 2 same-plate controls: expected AP of a random ranking
    assert per.loc["A", "chance_map"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert set(result.per_query["n_total_pairs"]) == {3}  # negatives are only the query plate's 2 controls
    assert result.mean_map == pytest.approx(0.75)


def test_activity_negatives_from_every_plate_without_plate_key():
    result = phenotypic_activity(_hand_made(), plate_key=None, null_size=500, seed=0)
    assert set(result.per_query["n_total_pairs"]) == {5}


def test_activity_p_values_separate_strong_from_null_treatments():
    rng = np.random.default_rng(0)
    rows = []
    for p in ("P1", "P2", "P3"):
        for c in range(8):
            rows.append([f"{p}_C{c}", p, f"C{c}", "DMSO", 0.0, True, "", *rng.normal(size=4)])
        for r in range(2):
            strong = rng.normal(size=4) * 0.1 + 5 * np.eye(4)[0]
            rows.append([f"{p}_S{r}", p, f"S{r}", "strong", 1.0, False, "m", *strong])
            rows.append([f"{p}_N{r}", p, f"N{r}", "null", 1.0, False, "m", *rng.normal(size=4)])
    result = phenotypic_activity(_profiles(rows), null_size=5000, seed=1)
    per = result.per_group.set_index("treatment")
    assert per.loc["strong", "mean_average_precision"] == pytest.approx(1.0)
    assert bool(per.loc["strong", "below_corrected_p"])
    assert not bool(per.loc["null", "below_corrected_p"])
    assert result.fraction_retrieved == pytest.approx(0.5)


def test_activity_is_seeded():
    a = phenotypic_activity(_hand_made(), null_size=300, seed=3).per_group["p_value"].to_numpy()
    b = phenotypic_activity(_hand_made(), null_size=300, seed=3).per_group["p_value"].to_numpy()
    np.testing.assert_array_equal(a, b)


def test_activity_needs_controls():
    p = _hand_made()
    data = p.data.assign(control=False)
    with pytest.raises(ValueError, match="no control wells"):
        phenotypic_activity(WellProfiles(data, FEATURES))


def test_activity_names_missing_metadata():
    p = _hand_made()
    with pytest.raises(KeyError, match="plate"):
        phenotypic_activity(WellProfiles(p.data.drop(columns="plate"), FEATURES))


def _mechanism_profiles():
    e = np.eye(4)
    rows = []
    for p in ("P1", "P2"):
        rows += [[f"{p}_C{c}", p, f"C{c}", "DMSO", 0.0, True, "", *e[3]] for c in range(2)]
        # mechanism m1: T1, T2 along f0; mechanism m2: T3, T4 along f1
        for t, v in (("T1", e[0]), ("T2", e[0] + 0.1 * e[2]), ("T3", e[1]), ("T4", e[1] + 0.1 * e[2])):
            rows.append([f"{p}_{t}", p, t, t, 1.0, False, "m1" if t in ("T1", "T2") else "m2", *v])
    return _profiles(rows)


def test_consistency_retrieves_shared_mechanisms():
    result = phenotypic_consistency(_mechanism_profiles(), null_size=500, seed=0)
    per = result.per_group.set_index("mechanism")
    assert per["mean_average_precision"].to_dict() == pytest.approx({"m1": 1.0, "m2": 1.0})
    # each consensus has 1 positive (the other treatment) and 2 negatives
    assert set(result.per_query["n_total_pairs"]) == {3}


def test_consistency_with_swapped_mechanisms_is_low():
    p = _mechanism_profiles()
    data = p.data.copy()
    data.loc[data["treatment"] == "T2", "mechanism"] = "m2"
    data.loc[data["treatment"] == "T3", "mechanism"] = "m1"
    result = phenotypic_consistency(WellProfiles(data, FEATURES), null_size=500, seed=0)
    # each query's one positive ties for (or takes) the last of three ranks: AP between 1/3 and 1/2
    assert 1 / 3 - 1e-9 <= result.mean_map <= 0.5 + 1e-9
    assert not result.per_group["below_corrected_p"].any()


def test_consensus_is_the_median_of_replicates():
    cons = consensus_profiles(_hand_made())
    b = cons.data.set_index("treatment").loc["B", FEATURES].to_numpy(float)
    np.testing.assert_allclose(b, [0, 0.5, 0.9, -0.5])
    assert "DMSO" not in set(cons.data["treatment"])


def test_percent_replicating_counts_real_replicates():
    rng = np.random.default_rng(0)
    rows = []
    directions = rng.normal(size=(6, 4))
    for t in range(6):
        for r in range(3):
            noise = rng.normal(size=4) * (0.05 if t < 3 else 3.0)
            rows.append([f"T{t}_{r}", "P1", f"W{t}{r}", f"T{t}", 1.0, False, "", *(directions[t] + noise)])
    rows += [[f"C{c}", "P1", f"C{c}", "DMSO", 0.0, True, "", *rng.normal(size=4)] for c in range(3)]
    value = percent_replicating(_profiles(rows), n_null=500, seed=0)
    assert value == pytest.approx(0.5)


def test_evaluate_profiles_summary_and_subsets():
    out = evaluate_profiles(_mechanism_profiles(), null_size=300, seed=0, subsets={"first": ["T1", "T2"]})
    assert out["map_activity"] == pytest.approx(1.0)
    assert out["map_consistency"] == pytest.approx(1.0)
    assert out["n_features"] == 4
    assert out["subsets"]["first"]["map_activity"] == pytest.approx(1.0)
