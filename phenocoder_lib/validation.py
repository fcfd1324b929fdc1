"""Input checks for the public boundary.

One helper per check; every message says what was expected, what was found and how to fix it.
Only built-in exception types are raised (``KeyError``, ``ValueError``, ``TypeError``,
``FileNotFoundError``) so callers can catch them without importing this package.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd


def _preview(values: Iterable[Any], limit: int = 12) -> str:
    values = [str(v) for v in values]
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


class PhenocoderKeyError(KeyError):
    """A ``KeyError`` whose message is shown verbatim (``KeyError`` quotes its argument)."""

    def __str__(self) -> str:  # pragma: no cover - trivial
        return str(self.args[0]) if self.args else ""


def check_key(mapping: Any, key: Any, *, argument: str, what: str, fix: str = "") -> None:
    """Raise a ``KeyError`` naming ``argument`` when ``key`` is not in ``mapping``."""
    keys = list(mapping.keys()) if hasattr(mapping, "keys") else list(mapping)
    if key not in keys:
        hint = f" {fix}" if fix else ""
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise PhenocoderKeyError(
            f"{argument}={key!r} is not {article} {what}; available: {_preview(keys)}.{hint}"
        )


def check_obs_column(obs: pd.DataFrame, column: str, *, argument: str) -> None:
    """The column must exist in ``.obs``."""
    check_key(obs.columns, column, argument=argument, what="column of .obs",
              fix="Pass one of the available columns or add the column to the table first.")


def check_obsm(adata: Any, key: str, *, argument: str, n_cols: Sequence[int] | None = None) -> np.ndarray:
    """Return ``adata.obsm[key]`` as an array after checking presence, width and finiteness."""
    check_key(adata.obsm, key, argument=argument, what="key of .obsm",
              fix="Store coordinates in .obsm first (columns y, x[, z]).")
    arr = np.asarray(adata.obsm[key])
    if arr.ndim != 2:
        raise ValueError(f"{argument}={key!r}: .obsm[{key!r}] must be 2-D (n_obs, n_dims), found shape {arr.shape}.")
    if n_cols is not None and arr.shape[1] not in n_cols:
        raise ValueError(
            f"{argument}={key!r}: .obsm[{key!r}] has {arr.shape[1]} columns, expected one of {list(n_cols)} "
            "(y, x for 2-D data; y, x, z for 3-D data)."
        )
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{argument}={key!r}: .obsm[{key!r}] must be numeric, found dtype {arr.dtype}.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(
            f"{argument}={key!r}: .obsm[{key!r}] has {bad} rows with NaN or inf coordinates; "
            "drop or fix those objects before calling this function."
        )
    return arr


def check_no_missing(obs: pd.DataFrame, column: str, *, argument: str) -> None:
    """The ``.obs`` column must exist and have no missing values (e.g. a sample id for every object)."""
    check_obs_column(obs, column, argument=argument)
    missing = obs[column].isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{argument}={column!r}: {int(missing.sum())} objects have no value (NaN) in .obs[{column!r}], e.g. "
            f"{_preview(obs.index[missing], 3)}; fill or drop them first."
        )


def check_unique_obs_names(adata: Any, *, argument: str) -> None:
    """Object names (``.obs_names``) must be unique: patches, latents and labels are joined on them."""
    names = pd.Index(adata.obs_names)
    if not names.is_unique:
        dup = names[names.duplicated()].unique()
        raise ValueError(
            f"{argument}: {len(dup)} object names occur more than once in .obs_names, e.g. {_preview(dup, 5)}; "
            "objects are matched by name. Make them unique first, e.g. adata.obs_names_make_unique() or "
            "adata.obs_names = adata.obs[sample_key].astype(str) + '_' + adata.obs['instance_id'].astype(str)."
        )


def check_categorical(obs: pd.DataFrame, column: str, *, argument: str) -> pd.Categorical:
    """The column must exist and be categorical (as scanpy's clustering writes it)."""
    check_obs_column(obs, column, argument=argument)
    col = obs[column]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        raise TypeError(
            f"{argument}={column!r}: .obs[{column!r}] must be categorical, found dtype {col.dtype}. "
            f"Convert it with adata.obs[{column!r}] = adata.obs[{column!r}].astype('category')."
        )
    return col.cat


def check_choice(value: Any, choices: Iterable[Any], *, argument: str) -> None:
    """``value`` must be one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{argument}={value!r} is not valid; choose one of {_preview(choices)}.")


def check_subset(values: Iterable[Any], choices: Iterable[Any], *, argument: str) -> list[Any]:
    """Every element of ``values`` must be one of ``choices``; returns the values as a list."""
    values, choices = list(values), list(choices)
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"{argument} has unknown entries {_preview(unknown)}; valid entries: {_preview(choices)}.")
    return values


def check_positive(value: float, *, argument: str, allow_zero: bool = False) -> None:
    """A positive (or non-negative) finite number."""
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{argument}={value!r} must be a finite number {bound}.")


def check_int_pair(value: Any, *, argument: str) -> tuple[int, int]:
    """A (height, width) pair of positive ints; a single int means a square."""
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        pair = tuple(int(v) for v in value)
    except TypeError as err:
        raise TypeError(f"{argument}={value!r} must be an int or a (height, width) pair of ints.") from err
    if len(pair) != 2 or min(pair) < 1 or any(float(a) != float(b) for a, b in zip(pair, value, strict=True)):
        raise ValueError(f"{argument}={value!r} must be a (height, width) pair of positive ints, e.g. (32, 32).")
    return pair  # type: ignore[return-value]


def require(condition: bool, message: str, exc: type[Exception] = ValueError) -> None:
    """Raise ``exc(message)`` unless ``condition`` holds (an ``assert`` that survives ``python -O``)."""
    if not condition:
        raise exc(message)


# --- added for clustering/patches/ingest ---


def check_in_range(
    value: Any, low: float | None, high: float | None, *, argument: str, high_open: bool = False, meaning: str = ""
) -> None:
    """``value`` must lie in ``[low, high]`` (``[low, high)`` with ``high_open``); ``None`` leaves a side open.

    Parameters
    ----------
    value
        The number to check; NaN is never in range.
    low, high
        The bounds; ``None`` for no bound on that side.
    argument
        The argument's name, for the message.
    high_open
        Whether ``high`` itself is excluded.
    meaning
        What the range means, added to the message in parentheses.

    Raises
    ------
    ValueError
        ``value`` is outside the range.
    """
    ok = (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        if low is not None and high is not None:
            bound = f"in [{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bound = f">= {low}"
        else:
            bound = f"{'<' if high_open else '<='} {high}"
        hint = f" ({meaning})" if meaning else ""
        raise ValueError(f"{argument}={value!r} must be {bound}{hint}.")
