"""Condition vectors of a conditional model: which columns, how they are encoded, where they are found.

Categorical columns are one-hot encoded over the categories seen in training (stored as JSON strings);
a category never seen in training (a new plate's ``dataset``, a new donor) encodes as the all-zero
vector, and a :class:`~phenocoder_lib.warnings.UnseenConditionWarning` reports the counts. Continuous
columns (``z`` and float columns) are scaled to [0, 1] by the training range; values outside it are
clipped to the range, reported the same way. Training builds the vectors of its patches, encoding those
of every object, from the same :class:`ConditionEncoder` (stored in ``model_config.json``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .validation import check_key
from .warnings import UnseenConditionWarning

__all__ = ["DEFAULT_CONTINUOUS", "ConditionEncoder", "condition_frame"]

#: Condition columns treated as continuous whatever their dtype.
DEFAULT_CONTINUOUS = ("z",)



@dataclass
class ConditionEncoder:
    """Encode condition columns as one vector per object (JSON-serializable, no pickles).

    Parameters
    ----------
    columns
        Condition column names, in order.
    kinds
        ``"categorical"`` or ``"continuous"`` per column.
    categories
        Training categories (strings) of each categorical column.
    ranges
        Training ``[min, max]`` of each continuous column.

    """

    columns: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)
    ranges: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit(
        cls, frame: pd.DataFrame, columns: Sequence[str], *, continuous: Sequence[str] | None = None
    ) -> ConditionEncoder:
        """Learn categories / ranges of ``columns`` from ``frame`` (the training objects).

        Parameters
        ----------
        frame
            One row per training object, with the condition columns.
        columns
            Condition column names, in order.
        continuous
            The continuous columns; default: ``z`` and every float column.

        Returns
        -------
        ConditionEncoder
            The fitted encoding.

        Raises
        ------
        KeyError
            When a column is not in ``frame``.
        TypeError
            When a continuous column is not numeric.
        ValueError
            When a continuous column has NaN or infinite values.

        """
        enc = cls(columns=list(columns))
        for col in enc.columns:
            check_key(frame.columns, col, argument="conditions", what="column of the training index",
                      fix="Add it to the table's .obs and keep it in the datasets: "
                          "generate_dataset(metadata_keys=...).")
            values = frame[col]
            is_cont = (col in continuous) if continuous is not None else (
                col in DEFAULT_CONTINUOUS or pd.api.types.is_float_dtype(values.dtype))
            if is_cont:
                if not pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(values.dtype):
                    raise TypeError(
                        f"condition {col!r} is treated as continuous but has dtype {values.dtype}; "
                        "continuous conditions must be numeric."
                    )
                v = values.to_numpy(np.float64)
                if not np.isfinite(v).all():
                    raise ValueError(f"condition {col!r} has NaN or infinite values; fill or drop them first.")
                enc.kinds[col] = "continuous"
                enc.ranges[col] = [float(v.min()), float(v.max())]
            else:
                enc.kinds[col] = "categorical"
                enc.categories[col] = sorted(pd.unique(_as_str(values)).tolist())
        return enc

    @property
    def width(self) -> int:
        """Length of the condition vector."""
        return sum(len(self.categories[c]) if self.kinds[c] == "categorical" else 1 for c in self.columns)

    @property
    def feature_names(self) -> list[str]:
        """One name per vector entry: ``column=category`` or ``column``."""
        names: list[str] = []
        for col in self.columns:
            if self.kinds[col] == "categorical":
                names += [f"{col}={cat}" for cat in self.categories[col]]
            else:
                names.append(col)
        return names

    def transform(self, frame: pd.DataFrame, *, where: str = "", warn: bool = True) -> tuple[np.ndarray, dict]:
        """Return the condition vectors of the rows of ``frame``, and a report of unseen values.

        Parameters
        ----------
        frame
            One row per object, with every condition column.
        where
            Text appended to messages, e.g. ``" of sample 'A01'"``.
        warn
            Emit an :class:`UnseenConditionWarning` when the report is not empty.

        Returns
        -------
        (vectors, report)
            ``(n, width)`` float32 vectors; the report maps column -> ``{"unseen": {value: count}}``
            (categorical) or ``{"clipped": count, "range": [min, max]}`` (continuous) for the
            columns that had any.

        Raises
        ------
        KeyError
            When a condition column is missing from ``frame``.
        ValueError
            When a continuous column has missing or non-numeric values.

        """
        n = len(frame)
        out = np.zeros((n, self.width), np.float32)
        report: dict[str, dict] = {}
        start = 0
        for col in self.columns:
            if col not in frame.columns:
                raise KeyError(f"condition {col!r} is missing from the objects to encode{where}.")
            if self.kinds[col] == "categorical":
                cats = self.categories[col]
                values = _as_str(frame[col]).to_numpy()
                codes = pd.Categorical(values, categories=cats).codes
                seen = codes >= 0
                out[np.flatnonzero(seen), start + codes[seen]] = 1.0
                if not seen.all():
                    counts = pd.Series(values[~seen]).value_counts()
                    report[col] = {"unseen": {str(k): int(v) for k, v in counts.items()}}
                start += len(cats)
            else:
                lo, hi = self.ranges[col]
                v = pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64)
                bad = ~np.isfinite(v)
                if bad.any():
                    raise ValueError(f"condition {col!r} has {int(bad.sum())} missing or non-numeric values{where}.")
                clipped = (v < lo) | (v > hi)
                if clipped.any():
                    report[col] = {"clipped": int(clipped.sum()), "range": [lo, hi]}
                scaled = (np.clip(v, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros(n)
                out[:, start] = scaled
                start += 1
        if report and warn:
            parts = []
            for col, rep in report.items():
                if "unseen" in rep:
                    parts.append(f"{col!r}: categories not seen in training {rep['unseen']} encoded as all-zero")
                else:
                    parts.append(f"{col!r}: {rep['clipped']} values outside the training range {rep['range']} clipped")
            warnings.warn(f"conditions{where}: " + "; ".join(parts) + ".", UnseenConditionWarning, stacklevel=2)
        return out, report

    def to_dict(self) -> dict[str, Any]:
        """Return the encoding as a JSON-compatible dict (stored in ``model_config.json``).

        Returns
        -------
        dict
            ``columns``, ``kinds``, ``categories`` and ``ranges``.

        """
        return {"columns": self.columns, "kinds": self.kinds, "categories": self.categories, "ranges": self.ranges}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConditionEncoder:
        """Rebuild an encoding from :meth:`to_dict`'s output.

        Parameters
        ----------
        data
            The dict.

        Returns
        -------
        ConditionEncoder
            The encoding.

        """
        return cls(columns=list(data["columns"]), kinds=dict(data["kinds"]),
                   categories={k: list(v) for k, v in data["categories"].items()},
                   ranges={k: list(v) for k, v in data["ranges"].items()})

    def to_json(self) -> str:
        """Return :meth:`to_dict` as a JSON string.

        Returns
        -------
        str
            JSON with sorted keys.

        """
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConditionEncoder:
        """Rebuild an encoding from :meth:`to_json`'s output.

        Parameters
        ----------
        text
            The JSON string.

        Returns
        -------
        ConditionEncoder
            The encoding.

        """
        return cls.from_dict(json.loads(text))


def _as_str(values: pd.Series) -> pd.Series:
    """Category labels as strings (ints, floats with integral values and strings alike: '3', 'A01')."""
    if pd.api.types.is_float_dtype(values.dtype):
        v = values.to_numpy(np.float64)
        if np.all(np.isfinite(v) & (v == np.round(v))):
            return pd.Series(v.astype(np.int64).astype(str), index=values.index)
    return values.astype(object).map(lambda x: "nan" if x is None or (isinstance(x, float) and np.isnan(x))
                                     else str(x))


def condition_frame(
    columns: Sequence[str],
    *,
    index: pd.DataFrame,
    sample_key: str,
    obs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Return the condition columns for the objects of a patch ``index`` (one row per index row).

    A column is taken from the index (``dataset``, ``sample``, ``z``, ``y``, ``x`` and the dataset's
    ``metadata_keys``); ``sample_key`` means the index's ``sample``; any other column is looked up in
    ``obs`` (the source table's ``.obs``) by ``obs_name``.

    Parameters
    ----------
    columns
        Condition column names.
    index
        The patch index of a dataset (one row per patch, with ``sample`` and ``obs_name``).
    sample_key
        The table's sample column (it means the index's ``sample``).
    obs
        The source table's ``.obs``, for the other columns.

    Returns
    -------
    pandas.DataFrame
        One row per index row, one column per condition.

    Raises
    ------
    KeyError
        When a column is found nowhere (the message names the fix), or patches are not objects of
        ``obs``.

    """
    out = pd.DataFrame(index=index.index)
    for col in columns:
        if col in index.columns and col not in ("row", "padded", "obs_name"):
            out[col] = index[col].to_numpy()
        elif col == sample_key:
            out[col] = index["sample"].to_numpy()
        elif obs is not None and col in obs.columns:
            missing = ~index["obs_name"].isin(obs.index)
            if missing.any():
                raise KeyError(
                    f"conditions: column {col!r} is looked up in the table .obs, but {int(missing.sum())} patches "
                    f"(e.g. {index['obs_name'][missing].iloc[:3].tolist()}) are not objects of that table."
                )
            out[col] = obs[col].reindex(index["obs_name"].to_numpy()).to_numpy()
        else:
            valid = sorted(set(index.columns) - {"row", "padded", "obs_name"}) + (
                sorted(map(str, obs.columns)) if obs is not None else [])
            raise KeyError(
                f"conditions: unknown condition column {col!r}; valid columns: {valid}. Add it to the table's "
                f".obs (and keep it in the dataset with generate_dataset(metadata_keys=[{col!r}]))."
            )
    return out
