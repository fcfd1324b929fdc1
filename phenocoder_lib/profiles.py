"""Well profiles: per-well aggregation, per-plate normalization against negative controls, feature selection.

Image-based profiling judges a representation by its *well profiles*: one vector per well, aggregated from
the objects of the well, normalized per plate against that plate's negative-control wells (which removes
plate effects such as a brighter lamp or a different stain batch) and reduced to informative, non-redundant
features. This module builds them for any object-level representation (CVAE latents, message-passed
latents, CellProfiler-style measurements) and for well-level ones (spatial graph statistics):

1. :func:`aggregate_wells` -- median (or mean) of the objects of each well;
   (:func:`aggregate_by_cluster`: the same per cluster of the objects);
2. :func:`normalize_profiles` -- robust z-score per plate against its controls
   (pycytominer's ``mad_robustize``: ``(x - median_ctrl) / (1.4826 * MAD_ctrl)``); a value missing in a
   well is set to the controls' median (0);
3. :func:`select_features` -- pycytominer's ``variance_threshold``, ``correlation_threshold`` and
   ``drop_outliers``;
4. optionally :func:`sphere_profiles` -- ZCA whitening fit on the control wells (pycytominer ``spherize``);
5. :func:`combine_profiles` -- blocks side by side, each scaled to the same total weight.

:func:`build_profiles` runs 2-4 on a well-level frame and returns a typed :class:`WellProfiles`.
Metadata (layout) columns are ``plate``, ``well``, ``treatment``, ``dose``, ``control``, ``mechanism``;
:func:`read_layout` reads them from a ``layout.csv`` beside a plate export.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: File name of a plate layout beside a plate export (well -> treatment, dose, control, mechanism).
LAYOUT_FILE = "layout.csv"
#: Required layout columns.
LAYOUT_COLUMNS = ("well", "treatment", "dose", "control")
#: Metadata columns a profile frame carries (those present).
METADATA_COLUMNS = ("sample", "plate", "well", "treatment", "dose", "control", "mechanism")
#: Default feature-selection operations (pycytominer names). ``drop_outliers`` drops features with a normalized
#: value beyond +-500 in some well: features that are zero up to rounding (e.g. odd central moments of a symmetric
#: nucleus) have a MAD of ~1e-16 and would otherwise reach z-scores of 1e15 and decide every similarity alone.
DEFAULT_SELECTION = ("variance_threshold", "correlation_threshold", "drop_outliers")


@contextmanager
def _pycytominer() -> Iterator[Any]:
    """Import pycytominer and run its calls without changing pandas' behaviour for the caller.

    pycytominer switches pandas' copy-on-write mode on for the whole process when it is imported
    (``pycytominer/__config__.py``). Under copy-on-write, arrays from ``Series.to_numpy()`` are read-only, so
    code elsewhere in the caller's program that writes into them would start to fail after the first profile
    was built. Its calls run with copy-on-write on, as pycytominer expects; the caller's setting is restored
    afterwards. (pandas 3 has copy-on-write always on and no such switch: nothing is done there.)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        try:
            previous = pd.get_option("mode.copy_on_write")
        except (KeyError, pd.errors.OptionError):
            previous = None
    if previous is None or int(pd.__version__.split(".")[0]) >= 3:
        import pycytominer

        yield pycytominer
        return
    pd.set_option("mode.copy_on_write", True)
    try:
        import pycytominer

        yield pycytominer
    finally:
        pd.set_option("mode.copy_on_write", previous)


@dataclass(frozen=True)
class WellProfiles:
    """Well profiles of one representation.

    Parameters
    ----------
    data
        One row per well: the metadata columns followed by the feature columns.
    features
        Feature column names (after selection); every other column of ``data`` is metadata.
    representation
        Name of the representation (``"latents"``, ``"graph_stats"``, ...).
    steps
        What was done, in order, with counts (features in/out, dropped features and why).

    """

    data: pd.DataFrame
    features: list[str]
    representation: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metadata(self) -> pd.DataFrame:
        """The metadata columns (every non-feature column)."""
        return self.data[[c for c in self.data.columns if c not in set(self.features)]]

    @property
    def values(self) -> np.ndarray:
        """Feature matrix (n_wells, n_features), float64."""
        return self.data[self.features].to_numpy(np.float64)

    @property
    def n_wells(self) -> int:
        """Number of wells (rows of ``data``)."""
        return int(len(self.data))


def read_layout(path: str | Path) -> pd.DataFrame:
    """Read a plate layout CSV (``well, treatment, dose, control[, mechanism]``) and check it.

    Parameters
    ----------
    path
        A ``layout.csv`` file, or a plate export folder holding one.

    Returns
    -------
    The layout with ``well`` and ``treatment`` as str, ``dose`` as float, ``control`` as bool and
    ``mechanism`` as str (empty when absent).

    """
    path = Path(path)
    if path.is_dir():
        path = path / LAYOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r}: no plate layout there; write a {LAYOUT_FILE} with columns "
                                f"{list(LAYOUT_COLUMNS)} (+ optional 'mechanism') beside the plate export.")
    layout = pd.read_csv(path, dtype={"well": str, "treatment": str, "mechanism": str}, keep_default_na=False)
    return check_layout(layout, argument=f"layout file {str(path)!r}")


def check_layout(layout: pd.DataFrame, *, argument: str = "layout") -> pd.DataFrame:
    """Return a checked copy of ``layout`` with normalized dtypes (see :func:`read_layout`).

    Parameters
    ----------
    layout
        One row per well with at least :data:`LAYOUT_COLUMNS` (``well, treatment, dose, control``), and
        optionally ``mechanism`` and ``plate``. ``control`` may be bool or text (true/false, 1/0, yes/no).
    argument
        How error messages name the layout (e.g. the file it was read from).

    Returns
    -------
    A copy with ``well``, ``treatment``, ``mechanism`` (and ``plate``) as str, ``dose`` as float (missing or
    non-numeric -> 0.0) and ``control`` as bool. Raises ``ValueError`` when a required column is missing,
    ``control`` holds other text, or a (plate,) well appears twice.

    """
    missing = [c for c in LAYOUT_COLUMNS if c not in layout.columns]
    if missing:
        raise ValueError(f"{argument} lacks columns {missing}; found {list(layout.columns)}. A layout needs "
                         f"{list(LAYOUT_COLUMNS)} (+ optional 'mechanism').")
    out = layout.copy()
    out["well"] = out["well"].astype(str)
    out["treatment"] = out["treatment"].astype(str)
    out["dose"] = pd.to_numeric(out["dose"], errors="coerce").fillna(0.0).astype(float)
    control = out["control"]
    if control.dtype != bool:
        text = control.astype(str).str.strip().str.lower()
        bad = sorted(set(text) - {"true", "false", "1", "0", "yes", "no"})
        if bad:
            raise ValueError(f"{argument}: column 'control' holds {bad}; use true/false (or 1/0).")
        control = text.isin(["true", "1", "yes"])
    out["control"] = control.astype(bool)
    out["mechanism"] = out["mechanism"].astype(str) if "mechanism" in out.columns else ""
    keys = ["plate", "well"] if "plate" in out.columns else ["well"]
    if "plate" in out.columns:
        out["plate"] = out["plate"].astype(str)
    dup = out.loc[out.duplicated(keys), keys].drop_duplicates().to_numpy().tolist()
    if dup:
        raise ValueError(f"{argument} lists {keys} {dup[:5]} more than once; each well needs exactly one row.")
    return out


def aggregate_wells(
    values: np.ndarray,
    groups: Sequence[Any],
    *,
    feature_names: Sequence[str] | None = None,
    method: Literal["median", "mean"] = "median",
    prefix: str = "",
) -> pd.DataFrame:
    """Aggregate object-level values to one row per group (well).

    Parameters
    ----------
    values
        (n_objects, n_features) object-level values (NaN ignored).
    groups
        Group (sample / well) of each object.
    feature_names
        Column names (default ``f"{prefix}{i}"``).
    method
        ``"median"`` (robust to a few mis-segmented objects; the field's default) or ``"mean"``.
    prefix
        Prepended to every feature name (keeps blocks apart when profiles are combined).

    Returns
    -------
    DataFrame indexed by group (sorted), one column per feature, plus ``n_objects``.

    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (n_objects, n_features), got shape {values.shape}.")
    groups = np.asarray(groups).astype(str)
    if groups.shape != (values.shape[0],):
        raise ValueError(f"groups has {groups.shape[0] if groups.ndim else 0} entries for {values.shape[0]} "
                         "objects; pass one group label per row of values.")
    if method not in ("median", "mean"):
        raise ValueError(f"method={method!r} is not supported; use 'median' or 'mean'.")
    names = list(feature_names) if feature_names is not None else [str(i) for i in range(values.shape[1])]
    if len(names) != values.shape[1]:
        raise ValueError(f"feature_names has {len(names)} names for {values.shape[1]} columns.")
    frame = pd.DataFrame(values, columns=[f"{prefix}{n}" for n in names])
    grouped = frame.groupby(groups, sort=True)
    out = grouped.median() if method == "median" else grouped.mean()
    out["n_objects"] = grouped.size()
    out.index.name = "sample"
    return out


def aggregate_table(
    table: Any,
    *,
    layer: str | None = None,
    sample_key: str = "sample",
    method: Literal["median", "mean"] = "median",
    prefix: str = "",
) -> pd.DataFrame:
    """Per-well aggregate of an object table (AnnData): ``.X`` or ``.layers[layer]``, grouped by ``sample_key``.

    Parameters
    ----------
    table
        AnnData with one row per object; ``table.var_names`` become the feature names.
    layer
        Aggregate ``table.layers[layer]`` (e.g. ``"spatial_message_passing"``) instead of ``table.X``.
    sample_key
        ``table.obs`` column holding each object's sample (well).
    method
        ``"median"`` or ``"mean"`` (:func:`aggregate_wells`).
    prefix
        Prepended to every feature name.

    Returns
    -------
    DataFrame indexed by sample (sorted), one column per variable of the table, plus ``n_objects``.

    """
    if sample_key not in table.obs.columns:
        raise KeyError(f"sample_key={sample_key!r} is not a column of the table's obs; available: "
                       f"{list(table.obs.columns)[:12]}.")
    if layer is not None and layer not in table.layers:
        raise KeyError(f"layer={layer!r} is not a layer of the table; available: {list(table.layers)}. "
                       "Message-passed latents exist after encode(spatial_message_passing_radius=...).")
    x = table.layers[layer] if layer is not None else table.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return aggregate_wells(x, table.obs[sample_key].astype(str).to_numpy(),
                           feature_names=[str(v) for v in table.var_names], method=method, prefix=prefix)


def aggregate_by_cluster(
    table: Any,
    *,
    cluster_key: str,
    layer: str | None = None,
    sample_key: str = "sample",
    method: Literal["median", "mean"] = "median",
    prefix: str = "",
    min_fraction: float = 0.05,
) -> pd.DataFrame:
    """Per-well aggregate of each cluster's objects: columns ``f"{prefix}{feature}|{cluster_key}={c}"``.

    A well's median over all its objects mixes cell types, so it moves when the mix moves and hides a change
    of one type behind the others; one aggregate per cluster (e.g. per Leiden cluster of the latents, a
    proxy of the cell type) keeps them apart. Clusters holding fewer than ``min_fraction`` of all objects
    are left out; a cluster absent from a well gives NaN (set to the controls' median by
    :func:`normalize_profiles`).

    Parameters
    ----------
    table
        AnnData with one row per object.
    cluster_key
        ``table.obs`` column with each object's cluster label.
    layer
        Aggregate ``table.layers[layer]`` instead of ``table.X``.
    sample_key
        ``table.obs`` column holding each object's sample (well).
    method
        ``"median"`` or ``"mean"`` (:func:`aggregate_wells`).
    prefix
        Prepended to every feature name (before the cluster suffix).
    min_fraction
        Smallest fraction of all objects a cluster must hold to get its own columns.

    Returns
    -------
    DataFrame indexed by every sample of the table (sorted), one column per (feature, kept cluster); no
    ``n_objects`` column.

    """
    if cluster_key not in table.obs.columns:
        raise KeyError(f"cluster_key={cluster_key!r} is not a column of the table's obs; cluster the objects first.")
    clusters = table.obs[cluster_key].astype(str).to_numpy()
    names, counts = np.unique(clusters, return_counts=True)
    kept = names[counts >= min_fraction * len(clusters)]
    x = table.layers[layer] if layer is not None else table.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    samples = table.obs[sample_key].astype(str).to_numpy()
    parts = []
    for c in kept:
        rows = clusters == c
        agg = aggregate_wells(x[rows], samples[rows], feature_names=[str(v) for v in table.var_names], method=method,
                              prefix=prefix).drop(columns="n_objects")
        parts.append(agg.add_suffix(f"|{cluster_key}={c}"))
    out = pd.concat(parts, axis=1) if parts else pd.DataFrame(index=pd.Index(np.unique(samples), name="sample"))
    return out.reindex(np.unique(samples))


def attach_layout(features: pd.DataFrame, samples: pd.DataFrame, layout: pd.DataFrame) -> pd.DataFrame:
    """Join well-level features with their plate/well and the layout (treatment, dose, control, mechanism).

    Parameters
    ----------
    features
        Indexed by sample; feature columns (``n_objects`` is dropped).
    samples
        Columns ``sample``, ``plate``, ``well``.
    layout
        Columns ``well``, ``treatment``, ``dose``, ``control`` (+ ``mechanism``), and ``plate`` when one
        layout covers several plates (otherwise it applies to every plate).

    Returns
    -------
    Metadata columns (:data:`METADATA_COLUMNS`) followed by the features, one row per sample with a layout
    entry (samples without one are dropped with a warning).

    """
    layout = check_layout(layout)
    keys = ["plate", "well"] if "plate" in layout.columns else ["well"]
    meta = samples[["sample", "plate", "well"]].astype(str).drop_duplicates("sample")
    if "plate" in layout.columns:
        layout = layout.assign(plate=layout["plate"].astype(str))
    meta = meta.merge(layout, on=keys, how="left", validate="one_to_one")
    missing = meta["treatment"].isna()
    if missing.any():
        logger.warning("%d samples have no layout entry and are left out of the profiles: %s",
                       int(missing.sum()), meta.loc[missing, "sample"].tolist()[:10])
        meta = meta[~missing]
    feats = features.drop(columns=["n_objects"], errors="ignore")
    feats = feats.reindex(meta["sample"].to_numpy())
    cols = [c for c in METADATA_COLUMNS if c in meta.columns]
    out = pd.concat([meta[cols].reset_index(drop=True), feats.reset_index(drop=True)], axis=1)
    out["control"] = out["control"].astype(bool)
    return out


def _split(profiles: pd.DataFrame, features: Sequence[str] | None) -> list[str]:
    if features is None:
        features = [c for c in profiles.columns if c not in METADATA_COLUMNS]
    features = list(features)
    missing = [f for f in features if f not in profiles.columns]
    if missing:
        raise KeyError(f"features {missing[:5]} are not columns of the profiles.")
    if not features:
        raise ValueError("profiles have no feature columns.")
    return features


def _check_controls(profiles: pd.DataFrame, plate_key: str, control_key: str, minimum: int) -> None:
    for col in (plate_key, control_key):
        if col not in profiles.columns:
            raise KeyError(f"profiles lack the column {col!r}; attach the layout first (attach_layout).")
    counts = profiles[profiles[control_key].astype(bool)].groupby(plate_key).size()
    counts = counts.reindex(profiles[plate_key].unique(), fill_value=0)
    short = counts[counts < minimum]
    if len(short):
        raise ValueError(f"plates {short.to_dict()} have fewer than {minimum} negative-control wells; a robust "
                         "per-plate normalization needs them on every plate (mark them control=true in the layout).")


def normalize_profiles(
    profiles: pd.DataFrame,
    features: Sequence[str] | None = None,
    *,
    plate_key: str = "plate",
    control_key: str = "control",
    method: Literal["mad_robustize", "standardize", "robustize"] = "mad_robustize",
    max_missing: float = 0.25,
) -> tuple[pd.DataFrame, list[str]]:
    """Normalize every plate against its own negative-control wells (pycytominer ``normalize``).

    Features are dropped first when their controls do not vary on some plate (MAD 0: there is no scale to
    normalize by, and a tiny epsilon would turn any treated value into a huge outlier) or when more than
    ``max_missing`` of the wells lack a value. A value missing in a well that is kept (NaN or inf: e.g. the
    interaction statistics of a cluster absent from that well) is set to 0 after normalization, the
    controls' median: "no evidence of a difference".

    Parameters
    ----------
    profiles
        One row per well with ``plate_key``, ``control_key`` and feature columns.
    features
        Feature columns (default: every column that is not metadata).
    plate_key, control_key
        Plate id and negative-control flag columns.
    method
        pycytominer method; ``mad_robustize`` is the field's default for well profiles.
    max_missing
        Largest fraction of wells without a value for a feature to be kept.

    Returns
    -------
    The normalized frame (same row order, kept features only) and the dropped features.

    """
    features = _split(profiles, features)
    if not 0 <= max_missing < 1:
        raise ValueError(f"max_missing={max_missing!r} must be in [0, 1).")
    _check_controls(profiles, plate_key, control_key, minimum=2)
    profiles = profiles.copy()
    values = profiles[features].astype(np.float64)
    profiles[features] = values.where(np.isfinite(values))
    ctrl = profiles[profiles[control_key].astype(bool)]
    x = ctrl[features]
    mad = x.groupby(ctrl[plate_key]).agg(lambda s: float(np.nanmedian(np.abs(s - np.nanmedian(s))))
                                         if s.notna().any() else np.nan)
    missing = profiles[features].isna().mean()
    keep = [f for f in features if bool((mad[f] > 0).all()) and float(missing[f]) <= max_missing]
    dropped = [f for f in features if f not in keep]
    if not keep:
        raise ValueError("every feature is constant among the control wells of some plate (or mostly missing); "
                         "nothing is left to normalize.")
    meta = [c for c in profiles.columns if c not in set(features)]
    parts = []
    for _, part in profiles[meta + keep].groupby(plate_key, sort=False):
        part = part.copy()
        # pycytominer selects the fit rows with DataFrame.query; a private flag column keeps that robust
        part["_is_control"] = part[control_key].astype(bool)
        with _pycytominer() as pycytominer:
            norm = pycytominer.normalize(part, features=keep, meta_features=[*meta, "_is_control"],
                                         samples="_is_control == True", method=method)
        parts.append(norm.drop(columns="_is_control"))
    out = pd.concat(parts).loc[profiles.index]
    out[keep] = out[keep].fillna(0.0)
    return out[meta + keep], dropped


def select_features(
    profiles: pd.DataFrame,
    features: Sequence[str] | None = None,
    *,
    operations: Sequence[str] = DEFAULT_SELECTION,
    corr_threshold: float = 0.9,
    min_variance: float = 1e-6,
    outlier_cutoff: float = 500.0,
) -> tuple[list[str], list[str]]:
    """Feature selection with pycytominer ``feature_select``; returns (kept, dropped) feature names.

    ``variance_threshold`` drops features with variance below ``min_variance``; ``correlation_threshold`` drops
    one of every pair correlated above ``corr_threshold`` (pycytominer keeps the one least correlated overall);
    ``drop_outliers`` drops features with an absolute value above ``outlier_cutoff`` (for normalized profiles).

    Parameters
    ----------
    profiles
        One row per well with the feature columns (normally the output of :func:`normalize_profiles`).
    features
        Feature columns to select from (default: every non-metadata column).
    operations
        pycytominer ``feature_select`` operations, applied in order.
    corr_threshold
        Pearson correlation in (0, 1] above which one feature of a pair is dropped.
    min_variance
        Variance below which ``variance_threshold`` drops a feature.
    outlier_cutoff
        Absolute value beyond which ``drop_outliers`` drops a feature.

    Returns
    -------
    ``(kept, dropped)``: feature names in their input order. When every feature would be dropped, the most
    variable one is kept. Fewer than two features are returned unchanged.

    """
    features = _split(profiles, features)
    if not 0 < corr_threshold <= 1:
        raise ValueError(f"corr_threshold={corr_threshold!r} must be in (0, 1].")
    if len(features) < 2:
        return features, []
    with _pycytominer() as pycytominer:
        out = pycytominer.feature_select(profiles[features].astype(np.float64).reset_index(drop=True),
                                         features=features, operation=list(operations),
                                         corr_threshold=corr_threshold, min_variance=min_variance,
                                         outlier_cutoff=outlier_cutoff)
    kept = [f for f in features if f in out.columns]
    if not kept:  # every feature flagged: keep the most variable one rather than nothing
        kept = [str(profiles[features].var().idxmax())]
    return kept, [f for f in features if f not in kept]


def sphere_profiles(
    profiles: pd.DataFrame,
    features: Sequence[str] | None = None,
    *,
    control_key: str = "control",
    epsilon: float = 1e-6,
) -> pd.DataFrame:
    """ZCA-cor sphering fit on the control wells of all plates (pycytominer ``spherize``).

    Parameters
    ----------
    profiles
        One row per well, normally normalized and selected, with ``control_key``.
    features
        Feature columns to sphere (default: every non-metadata column).
    control_key
        Negative-control flag; the sphering transform is fit on these wells only and applied to all.
    epsilon
        Added to the eigenvalues of the controls' covariance before inverting (regularizes near-singular
        directions when there are fewer control wells than features).

    Returns
    -------
    A new frame (same index) with the metadata columns followed by the sphered features.

    """
    features = _split(profiles, features)
    meta = [c for c in profiles.columns if c not in set(features)]
    n_ctrl = int(profiles[control_key].astype(bool).sum())
    if n_ctrl < 2:
        raise ValueError(f"sphering needs at least 2 control wells, found {n_ctrl}.")
    frame = profiles.copy()
    frame["_is_control"] = frame[control_key].astype(bool)
    with _pycytominer() as pycytominer:
        out = pycytominer.normalize(frame, features=list(features), meta_features=[*meta, "_is_control"],
                                    samples="_is_control == True", method="spherize", spherize_epsilon=epsilon)
    out.index = profiles.index
    return out.drop(columns="_is_control")[meta + list(features)]


def build_profiles(
    profiles: pd.DataFrame,
    features: Sequence[str] | None = None,
    *,
    representation: str = "",
    normalize: bool = True,
    feature_selection: Sequence[str] | None = DEFAULT_SELECTION,
    corr_threshold: float = 0.9,
    sphere: bool = False,
    plate_key: str = "plate",
    control_key: str = "control",
) -> WellProfiles:
    """Normalize per plate against controls, select features and optionally sphere.

    Parameters
    ----------
    profiles
        One row per well: metadata (:func:`attach_layout`) and raw aggregated features.
    features
        Feature columns (default: every non-metadata column).
    representation
        Name recorded in the result.
    normalize
        Robust z-score per plate against the plate's control wells (:func:`normalize_profiles`).
    feature_selection
        pycytominer operations (``None`` or empty: keep every feature).
    corr_threshold
        Correlation above which one of two features is dropped.
    sphere
        ZCA sphering on the control wells after selection (:func:`sphere_profiles`).
    plate_key, control_key
        Column names.

    Returns
    -------
    :class:`WellProfiles` with the steps recorded.

    """
    features = _split(profiles, features)
    steps: list[dict[str, Any]] = [{"step": "input", "n_features": len(features), "n_wells": int(len(profiles))}]
    data = profiles.reset_index(drop=True)
    if normalize:
        data, dropped = normalize_profiles(data, features, plate_key=plate_key, control_key=control_key)
        features = [f for f in features if f not in dropped]
        steps.append({"step": "mad_robustize per plate vs controls", "n_features": len(features),
                      "dropped_constant_in_controls": len(dropped)})
    else:
        bad = [f for f in features if not np.isfinite(data[f].to_numpy(float)).all()]
        features = [f for f in features if f not in bad]
        steps.append({"step": "drop non-finite", "n_features": len(features), "dropped": len(bad)})
    if feature_selection:
        features, dropped = select_features(data, features, operations=feature_selection,
                                            corr_threshold=corr_threshold)
        steps.append({"step": "feature_select " + "+".join(feature_selection), "n_features": len(features),
                      "dropped": len(dropped)})
    if sphere:
        data = sphere_profiles(data[[c for c in data.columns if c in METADATA_COLUMNS] + features], features,
                               control_key=control_key)
        steps.append({"step": "spherize (ZCA-cor on controls)", "n_features": len(features)})
    meta = [c for c in data.columns if c in METADATA_COLUMNS]
    return WellProfiles(data[meta + features].copy(), list(features), representation, steps)


def combine_profiles(blocks: Mapping[str, WellProfiles], *, representation: str = "combined") -> WellProfiles:
    """Put profile blocks side by side, each scaled by ``1/sqrt(n_features)``.

    Scaling gives every block the same expected squared norm, so a block with hundreds of features does
    not drown one with ten in the cosine similarities that retrieval uses. Blocks must cover the same
    samples; their rows are aligned on ``sample``.

    Parameters
    ----------
    blocks
        Name -> profiles, at least two; each must have a ``sample`` column and cover the first block's samples.
    representation
        Name recorded in the result.

    Returns
    -------
    :class:`WellProfiles` with the first block's metadata and features named ``f"{block}|{feature}"``.

    """
    if len(blocks) < 2:
        raise ValueError(f"combine_profiles needs at least two blocks, got {list(blocks)}.")
    names = list(blocks)
    first = blocks[names[0]]
    if "sample" not in first.data.columns:
        raise KeyError("profiles need a 'sample' column to be combined.")
    samples = first.data["sample"].astype(str)
    meta = first.metadata.reset_index(drop=True)
    parts, features = [], []
    for name in names:
        block = blocks[name]
        data = block.data.set_index(block.data["sample"].astype(str))
        missing = sorted(set(samples) - set(data.index))
        if missing:
            raise ValueError(f"block {name!r} lacks samples {missing[:5]}; build every block on the same wells.")
        x = data.loc[samples, block.features].to_numpy(np.float64) / np.sqrt(len(block.features))
        cols = [f"{name}|{f}" for f in block.features]
        parts.append(pd.DataFrame(x, columns=cols))
        features += cols
    data = pd.concat([meta, *parts], axis=1)
    steps = [{"step": "combine", "blocks": {n: len(blocks[n].features) for n in names}, "n_features": len(features)}]
    return WellProfiles(data, features, representation, steps)
