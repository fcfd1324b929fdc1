"""Profile evaluation as image-based profiling reports it: retrieval mAP with copairs, and percent replicating.

- **Phenotypic activity** (:func:`phenotypic_activity`): each treatment well (a query) ranks its replicate wells
  (same treatment and dose, any plate) against the negative-control wells of its own plate by cosine
  similarity; the average precision (AP) of that ranking is averaged per treatment-dose (mAP). A permutation
  p-value compares the mAP with random rankings of the same size, Benjamini-Hochberg correction gives q; a
  treatment-dose is *retrieved* when q < 0.05.
- **Phenotypic consistency** (:func:`phenotypic_consistency`): consensus profiles (median over replicate
  wells) of the treatment-doses rank those of other treatments sharing their mechanism against those of other
  mechanisms. Only mechanisms with at least two treatments are scored.
- **Percent replicating** (:func:`percent_replicating`): the fraction of treatment-doses whose median
  replicate correlation exceeds the 95th percentile of the same statistic over random non-replicate groups.

:func:`evaluate_profiles` returns the four summary figures of one representation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .profiles import WellProfiles

logger = logging.getLogger(__name__)

#: q-value threshold of "retrieved".
Q_THRESHOLD = 0.05
_REF = "_reference_index"


@dataclass(frozen=True)
class RetrievalResult:
    """mAP per group and its summary.

    Parameters
    ----------
    per_group
        One row per group: key columns, ``mean_average_precision``, ``p_value``, ``corrected_p_value``,
        ``below_corrected_p`` (retrieved), ``chance_map`` (mAP expected from a random ranking).
    per_query
        AP of every query profile (``average_precision``, ``n_pos_pairs``, ``n_total_pairs``).

    """

    per_group: pd.DataFrame
    per_query: pd.DataFrame

    @property
    def mean_map(self) -> float:
        """Mean of the groups' mAP (NaN when no group was scored)."""
        return float(self.per_group["mean_average_precision"].mean()) if len(self.per_group) else float("nan")

    @property
    def fraction_retrieved(self) -> float:
        """Fraction of groups with q < 0.05."""
        return float(self.per_group["below_corrected_p"].mean()) if len(self.per_group) else float("nan")

    @property
    def chance_map(self) -> float:
        """Mean over the groups of the mAP a random ranking would get (NaN when no group was scored)."""
        return float(self.per_group["chance_map"].mean()) if len(self.per_group) else float("nan")


def _meta_and_features(profiles: WellProfiles | pd.DataFrame, features: Sequence[str] | None):
    if isinstance(profiles, WellProfiles):
        return profiles.metadata.reset_index(drop=True), profiles.values
    if features is None:
        raise ValueError("pass features= with a plain DataFrame (or pass WellProfiles).")
    frame = profiles.reset_index(drop=True)
    return frame.drop(columns=list(features)), frame[list(features)].to_numpy(np.float64)


def _check_columns(meta: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in meta.columns]
    if missing:
        raise KeyError(f"profiles lack metadata columns {missing}; available: {list(meta.columns)}. "
                       "Attach the plate layout (phenocoder_lib.profiles.attach_layout).")


def _map(meta: pd.DataFrame, x: np.ndarray, *, group: list[str], pos_sameby, pos_diffby, neg_sameby, neg_diffby,
         null_size: int, seed: int) -> RetrievalResult:
    from copairs.map import average_precision, mean_average_precision
    from copairs.map.normalization import expected_ap

    if not np.isfinite(x).all():
        raise ValueError("profiles hold non-finite values; build them with phenocoder_lib.profiles.build_profiles.")
    ap = average_precision(meta, x, pos_sameby=pos_sameby, pos_diffby=pos_diffby, neg_sameby=neg_sameby,
                           neg_diffby=neg_diffby, distance="cosine", progress_bar=False)
    ap = ap[ap["n_pos_pairs"] > 0].copy()
    if ap.empty:
        return RetrievalResult(pd.DataFrame(columns=[*group, "mean_average_precision", "p_value",
                                                     "corrected_p_value", "below_corrected_p", "chance_map"]), ap)
    ap["chance_ap"] = [expected_ap(int(m), int(t - m)) for m, t in zip(ap["n_pos_pairs"], ap["n_total_pairs"],
                                                                      strict=True)]
    scores = mean_average_precision(ap, sameby=group, null_size=null_size, threshold=Q_THRESHOLD, seed=seed,
                                    progress_bar=False, max_workers=1)
    chance = ap.groupby(group, observed=True)["chance_ap"].mean().rename("chance_map").reset_index()
    scores = scores.drop(columns=["indices"], errors="ignore").merge(chance, on=group, how="left")
    return RetrievalResult(scores, ap)


def _treatment_key(meta: pd.DataFrame, treatment_key: str, dose_key: str | None) -> pd.Series:
    key = meta[treatment_key].astype(str)
    if dose_key is not None and dose_key in meta.columns:
        key = key + "@" + meta[dose_key].astype(str)
    return key


def phenotypic_activity(
    profiles: WellProfiles | pd.DataFrame,
    features: Sequence[str] | None = None,
    *,
    treatment_key: str = "treatment",
    dose_key: str | None = "dose",
    control_key: str = "control",
    plate_key: str | None = "plate",
    null_size: int = 10000,
    seed: int = 0,
) -> RetrievalResult:
    """Retrieval of each treatment-dose's replicates against the negative controls (mAP per treatment-dose).

    Parameters
    ----------
    profiles
        Well profiles with metadata (``treatment``, ``dose``, ``control``, ``plate``).
    features
        Feature columns when ``profiles`` is a plain DataFrame.
    treatment_key, dose_key
        A group is one (treatment, dose); ``dose_key=None`` groups by treatment only.
    control_key
        Negative-control flag; controls are only ever negatives (never each other's positives).
    plate_key
        Negatives are the controls of the query's own plate (``None``: controls of every plate).
    null_size, seed
        Permutations of the null distribution and its seed.

    Returns
    -------
    :class:`RetrievalResult`: ``per_group`` has one row per treatment-dose (``treatment_dose``, mAP, p, q,
    ``below_corrected_p``, ``chance_map``, and the ``treatment``, ``dose``, ``mechanism`` of the group);
    ``per_query`` the AP of every treated well with at least one replicate.

    """
    meta, x = _meta_and_features(profiles, features)
    _check_columns(meta, [treatment_key, control_key] + ([plate_key] if plate_key else []))
    meta = meta.copy()
    meta["_group"] = _treatment_key(meta, treatment_key, dose_key)
    control = meta[control_key].astype(bool).to_numpy()
    if not control.any():
        raise ValueError(f"no control wells ({control_key}=True) among the profiles; activity needs negatives.")
    # every control gets its own reference index, so controls never pair up as positives; treatments share -1
    meta[_REF] = np.where(control, np.arange(len(meta)), -1)
    result = _map(meta, x, group=["_group"], pos_sameby=["_group", _REF], pos_diffby=[],
                  neg_sameby=[plate_key] if plate_key else [], neg_diffby=["_group", _REF],
                  null_size=null_size, seed=seed)
    per_group = result.per_group.rename(columns={"_group": "treatment_dose"})
    per_query = result.per_query.drop(columns=[_REF], errors="ignore").rename(columns={"_group": "treatment_dose"})
    if len(per_group):
        first = meta.drop_duplicates("_group").set_index("_group")
        for col in (treatment_key, dose_key, "mechanism"):
            if col and col in first.columns:
                per_group[col] = per_group["treatment_dose"].map(first[col]).to_numpy()
    return RetrievalResult(per_group, per_query)


def consensus_profiles(
    profiles: WellProfiles,
    *,
    treatment_key: str = "treatment",
    dose_key: str | None = "dose",
    control_key: str = "control",
) -> WellProfiles:
    """Median profile of each treatment-dose over its replicate wells (controls left out).

    Parameters
    ----------
    profiles
        Well profiles with ``treatment_key`` and ``control_key`` metadata.
    treatment_key, dose_key
        A group is one (treatment, dose); ``dose_key=None`` groups by treatment only.
    control_key
        Negative-control flag; control wells get no consensus profile.

    Returns
    -------
    :class:`WellProfiles` with one row per treatment-dose (sorted by ``treatment_dose``): ``treatment_dose``,
    ``treatment``, ``dose``, ``mechanism`` (those present) and the median of every feature; ``steps`` extended.

    """
    meta = profiles.metadata.reset_index(drop=True)
    _check_columns(meta, [treatment_key, control_key])
    data = profiles.data.reset_index(drop=True)
    data = data[~data[control_key].astype(bool).to_numpy()].copy()
    data["treatment_dose"] = _treatment_key(data, treatment_key, dose_key)
    keep = [c for c in ("treatment", "dose", "mechanism") if c in data.columns]
    values = data.groupby("treatment_dose", sort=True)[profiles.features].median()
    first = data.drop_duplicates("treatment_dose").set_index("treatment_dose")[keep].reindex(values.index)
    out = pd.concat([first, values], axis=1).reset_index()
    return WellProfiles(out, list(profiles.features), profiles.representation,
                        [*profiles.steps, {"step": "consensus (median over replicates)", "n_groups": len(out)}])


def phenotypic_consistency(
    profiles: WellProfiles,
    *,
    mechanism_key: str = "mechanism",
    treatment_key: str = "treatment",
    dose_key: str | None = "dose",
    control_key: str = "control",
    null_size: int = 10000,
    seed: int = 0,
) -> RetrievalResult:
    """Retrieval of treatments sharing a mechanism (mAP per mechanism) from consensus profiles.

    A query (one treatment-dose consensus) ranks the consensus profiles of *other* treatments of its mechanism
    against those of other mechanisms. Mechanisms with fewer than two treatments, and empty mechanism names,
    are left out.

    Parameters
    ----------
    profiles
        Well profiles with ``mechanism_key``, ``treatment_key`` and ``control_key`` metadata.
    mechanism_key
        Mechanism-of-action column; treatments sharing it are each other's positives.
    treatment_key, dose_key
        Consensus groups (:func:`consensus_profiles`); a positive must be a different treatment.
    control_key
        Negative-control flag; controls are left out.
    null_size, seed
        Permutations of the null distribution and its seed.

    Returns
    -------
    :class:`RetrievalResult` with one ``per_group`` row per scored mechanism; both frames are empty when fewer
    than two mechanisms have two treatments each.

    """
    meta = profiles.metadata
    _check_columns(meta, [mechanism_key, treatment_key, control_key])
    cons = consensus_profiles(profiles, treatment_key=treatment_key, dose_key=dose_key, control_key=control_key)
    data = cons.data
    mech = data[mechanism_key].astype(str)
    n_treat = data.groupby(mech)[treatment_key].nunique()
    scored = mech.isin(n_treat[n_treat >= 2].index) & (mech.str.len() > 0) & (mech.str.lower() != "nan")
    if scored.sum() < 2 or mech[scored].nunique() < 2:
        logger.info("consistency: fewer than two mechanisms with two treatments; nothing to score")
        return RetrievalResult(pd.DataFrame(columns=[mechanism_key, "mean_average_precision", "p_value",
                                                     "corrected_p_value", "below_corrected_p", "chance_map"]),
                               pd.DataFrame())
    sub = data[scored.to_numpy()].reset_index(drop=True)
    meta = sub[[c for c in sub.columns if c not in set(cons.features)]]
    return _map(meta, sub[cons.features].to_numpy(np.float64), group=[mechanism_key], pos_sameby=[mechanism_key],
                pos_diffby=[treatment_key], neg_sameby=[], neg_diffby=[mechanism_key], null_size=null_size,
                seed=seed)


def percent_replicating(
    profiles: WellProfiles,
    *,
    treatment_key: str = "treatment",
    dose_key: str | None = "dose",
    control_key: str = "control",
    n_null: int = 1000,
    percentile: float = 95.0,
    seed: int = 0,
) -> float:
    """Fraction of treatment-doses whose median replicate Pearson correlation beats a non-replicate null.

    The null draws ``n_null`` random groups of wells of the same size from *different* treatment-doses and
    takes their median pairwise correlation; its ``percentile`` is the threshold.

    Parameters
    ----------
    profiles
        Well profiles with ``treatment_key`` and ``control_key`` metadata.
    treatment_key, dose_key
        A group is one (treatment, dose); ``dose_key=None`` groups by treatment only.
    control_key
        Negative-control flag; control wells are left out of groups and null.
    n_null
        Random non-replicate groups drawn per group size.
    percentile
        Percentile of the null distribution a group's median correlation must exceed, in (0, 100).
    seed
        Seed of the null draws.

    Returns
    -------
    Fraction in [0, 1] of the treatment-doses with at least two wells that beat the threshold; NaN when no
    treatment-dose has two wells.

    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile={percentile!r} must be in (0, 100).")
    data = profiles.data.reset_index(drop=True)
    data = data[~data[control_key].astype(bool).to_numpy()]
    key = _treatment_key(data, treatment_key, dose_key).to_numpy()
    x = data[profiles.features].to_numpy(np.float64)
    if len(x) < 2:
        return float("nan")
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    corr = (x / np.where(norm > 0, norm, 1)) @ (x / np.where(norm > 0, norm, 1)).T

    def median_corr(idx: np.ndarray) -> float:
        sub = corr[np.ix_(idx, idx)]
        return float(np.median(sub[np.triu_indices(len(idx), 1)]))

    groups = {g: np.flatnonzero(key == g) for g in np.unique(key)}
    groups = {g: i for g, i in groups.items() if len(i) >= 2}
    if not groups:
        return float("nan")
    rng = np.random.default_rng(seed)
    replicate = {g: median_corr(i) for g, i in groups.items()}
    sizes = sorted({len(i) for i in groups.values()})
    threshold = {}
    for size in sizes:
        null = []
        for _ in range(n_null):
            # one well from each of `size` distinct treatment-doses: a group with no replicate pair
            chosen = rng.choice(list(groups), size=min(size, len(groups)), replace=False)
            idx = np.array([rng.choice(groups[g]) for g in chosen])
            if len(idx) >= 2:
                null.append(median_corr(idx))
        threshold[size] = float(np.percentile(null, percentile)) if null else float("inf")
    hits = [replicate[g] > threshold[len(i)] for g, i in groups.items()]
    return float(np.mean(hits))


def evaluate_profiles(
    profiles: WellProfiles,
    *,
    null_size: int = 10000,
    seed: int = 0,
    subsets: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Summary figures of one representation.

    Parameters
    ----------
    profiles
        Normalized well profiles with layout metadata.
    null_size, seed
        Permutation null of the p-values.
    subsets
        Optional name -> treatments: also report ``map_activity`` and ``fraction_retrieved_activity`` over
        those treatments' groups only (e.g. the spatial-arrangement treatments).

    Returns
    -------
    ``map_activity``, ``map_activity_chance``, ``fraction_retrieved_activity``, ``map_consistency``,
    ``fraction_retrieved_consistency``, ``percent_replicating``, ``n_features``, and per subset
    ``subsets: {name: {...}}``.

    """
    activity = phenotypic_activity(profiles, null_size=null_size, seed=seed)
    consistency = phenotypic_consistency(profiles, null_size=null_size, seed=seed)
    out: dict[str, Any] = {
        "map_activity": activity.mean_map,
        "map_activity_chance": activity.chance_map,
        "fraction_retrieved_activity": activity.fraction_retrieved,
        "map_consistency": consistency.mean_map,
        "fraction_retrieved_consistency": consistency.fraction_retrieved,
        "percent_replicating": percent_replicating(profiles, seed=seed),
        "n_features": len(profiles.features),
    }
    if subsets:
        groups = activity.per_group
        out["subsets"] = {}
        for name, treatments in subsets.items():
            rows = groups[groups["treatment"].astype(str).isin([str(t) for t in treatments])]
            out["subsets"][name] = {
                "map_activity": float(rows["mean_average_precision"].mean()) if len(rows) else float("nan"),
                "fraction_retrieved_activity": float(rows["below_corrected_p"].mean()) if len(rows) else float("nan"),
                "map_activity_chance": float(rows["chance_map"].mean()) if len(rows) else float("nan"),
            }
    return out
