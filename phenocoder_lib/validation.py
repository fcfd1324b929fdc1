"""Input checks for the public boundary: one helper per kind of check, used by every module.

Every message names the argument, the value found and the fix. Only built-in exception types are
raised (``KeyError``, ``ValueError``, ``TypeError``) so callers can catch them without importing this
package. Mode and method parameters are typed with ``typing.Literal``; :func:`check_choice` accepts
the ``Literal`` type itself, so the allowed strings are written once.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "PhenocoderKeyError",
    "check_bool",
    "check_categorical",
    "check_choice",
    "check_int",
    "check_int_pair",
    "check_key",
    "check_no_missing",
    "check_obs_column",
    "check_obsm",
    "check_positive",
    "check_subset",
    "check_type",
    "check_unique_obs_names",
    "literal_values",
    "require",
]


def _preview(values: Iterable[Any], limit: int = 12) -> str:
    values = [str(v) for v in values]
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _hint(fix: str) -> str:
    return f" {fix}" if fix else ""


class PhenocoderKeyError(KeyError):
    """A ``KeyError`` whose message is shown verbatim (``KeyError`` quotes its argument)."""

    def __str__(self) -> str:  # pragma: no cover - trivial
        return str(self.args[0]) if self.args else ""


def check_key(mapping: Any, key: Any, *, argument: str, what: str, fix: str = "") -> None:
    """Raise a ``KeyError`` naming ``argument`` when ``key`` is not in ``mapping``.

    Parameters
    ----------
    mapping
        Anything with ``keys()`` (a dict, ``.obsm``, ``sdata.tables``) or an iterable of keys.
    key
        The key the caller asked for.
    argument
        Name of the caller's argument that holds ``key``.
    what
        What the keys are, e.g. ``"column of .obs"`` (the message says "is not a <what>").
    fix
        Sentence appended to the message that says how to fix it.

    Raises
    ------
    KeyError
        Naming the argument, the key and the available keys.

    """
    keys = list(mapping.keys()) if hasattr(mapping, "keys") else list(mapping)
    if key not in keys:
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise PhenocoderKeyError(
            f"{argument}={key!r} is not {article} {what}; available: {_preview(keys)}.{_hint(fix)}"
        )


def check_obs_column(obs: pd.DataFrame, column: str, *, argument: str) -> None:
    """Check that a column exists in ``.obs``.

    Parameters
    ----------
    obs
        The table's ``.obs``.
    column
        Column name.
    argument
        Name of the caller's argument that holds ``column``.

    Raises
    ------
    KeyError
        When the column is missing.

    """
    check_key(obs.columns, column, argument=argument, what="column of .obs",
              fix="Pass one of the available columns or add the column to the table first.")


def check_obsm(adata: Any, key: str, *, argument: str, n_cols: Sequence[int] | None = None) -> np.ndarray:
    """Return ``adata.obsm[key]`` as an array after checking presence, width and finiteness.

    Parameters
    ----------
    adata
        AnnData with the coordinates in ``.obsm``.
    key
        ``.obsm`` key.
    argument
        Name of the caller's argument that holds ``key``.
    n_cols
        Allowed numbers of columns (e.g. ``(2, 3)`` for y, x[, z]); ``None`` allows any.

    Returns
    -------
    numpy.ndarray
        The 2-D numeric array (not copied).

    Raises
    ------
    KeyError
        When the key is missing.
    ValueError
        When the array is not 2-D, has another width or holds NaN or inf.
    TypeError
        When the array is not numeric.

    """
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
    """Check that an ``.obs`` column exists and has no missing values (e.g. a sample for every object).

    Parameters
    ----------
    obs
        The table's ``.obs``.
    column
        Column name.
    argument
        Name of the caller's argument that holds ``column``.

    Raises
    ------
    KeyError
        When the column is missing.
    ValueError
        When some objects have no value.

    """
    check_obs_column(obs, column, argument=argument)
    missing = obs[column].isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"{argument}={column!r}: {int(missing.sum())} objects have no value (NaN) in .obs[{column!r}], e.g. "
            f"{_preview(obs.index[missing], 3)}; fill or drop them first."
        )


def check_unique_obs_names(adata: Any, *, argument: str) -> None:
    """Check that object names (``.obs_names``) are unique: patches, latents and labels are joined on them.

    Parameters
    ----------
    adata
        The table.
    argument
        Name of the caller's argument that holds the table.

    Raises
    ------
    ValueError
        When some names occur more than once; the message shows how to make them unique.

    """
    names = pd.Index(adata.obs_names)
    if not names.is_unique:
        dup = names[names.duplicated()].unique()
        raise ValueError(
            f"{argument}: {len(dup)} object names occur more than once in .obs_names, e.g. {_preview(dup, 5)}; "
            "objects are matched by name. Make them unique first, e.g. adata.obs_names_make_unique() or "
            "adata.obs_names = adata.obs[sample_key].astype(str) + '_' + adata.obs['instance_id'].astype(str)."
        )


def check_categorical(obs: pd.DataFrame, column: str, *, argument: str) -> Any:
    """Check that a column exists and is categorical (as scanpy's clustering writes it).

    Parameters
    ----------
    obs
        The table's ``.obs``.
    column
        Column name.
    argument
        Name of the caller's argument that holds ``column``.

    Returns
    -------
    pandas.core.arrays.categorical.CategoricalAccessor
        The column's ``.cat`` accessor (``categories``, ``codes``).

    Raises
    ------
    KeyError
        When the column is missing.
    TypeError
        When it is not categorical; the message shows the conversion.

    """
    check_obs_column(obs, column, argument=argument)
    col = obs[column]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        raise TypeError(
            f"{argument}={column!r}: .obs[{column!r}] must be categorical, found dtype {col.dtype}. "
            f"Convert it with adata.obs[{column!r}] = adata.obs[{column!r}].astype('category')."
        )
    return col.cat


def literal_values(choices: Any) -> tuple[Any, ...]:
    """Return the allowed values of a ``typing.Literal`` type, or of any iterable, as a tuple.

    Parameters
    ----------
    choices
        ``Literal["a", "b"]`` or an iterable of values.

    Returns
    -------
    tuple
        The values, in their order.

    """
    if typing.get_origin(choices) is typing.Literal:
        return typing.get_args(choices)
    return tuple(choices)


def check_choice(value: Any, choices: Any, *, argument: str) -> Any:
    """Check that ``value`` is one of ``choices`` (a ``Literal`` type or an iterable).

    Parameters
    ----------
    value
        The value passed.
    choices
        ``Literal["a", "b"]`` (the parameter's own annotation) or an iterable of allowed values.
    argument
        Name of the argument.

    Returns
    -------
    object
        ``value``, unchanged.

    Raises
    ------
    ValueError
        Naming the argument, the value and the valid choices.

    """
    allowed = literal_values(choices)
    try:
        ok = value in allowed
    except TypeError:  # unhashable or incomparable values are not among the choices
        ok = False
    if not ok:
        raise ValueError(f"{argument}={value!r} is not valid; choose one of {_preview(allowed)}.")
    return value


def check_subset(values: Iterable[Any], choices: Iterable[Any], *, argument: str) -> list[Any]:
    """Check that every element of ``values`` is one of ``choices``.

    Parameters
    ----------
    values
        The values passed.
    choices
        The allowed values (or a ``Literal`` type).
    argument
        Name of the argument.

    Returns
    -------
    list
        ``values`` as a list.

    Raises
    ------
    ValueError
        Naming the unknown entries and the valid ones.

    """
    values, choices = list(values), list(literal_values(choices))
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ValueError(f"{argument} has unknown entries {_preview(unknown)}; valid entries: {_preview(choices)}.")
    return values


def check_type(value: Any, types: type | tuple[type, ...], *, argument: str, expected: str, fix: str = "") -> Any:
    """Check that ``value`` is an instance of ``types``.

    Parameters
    ----------
    value
        The value passed.
    types
        Accepted type or types (as for ``isinstance``).
    argument
        Name of the argument.
    expected
        The accepted types in words, e.g. ``"a str or a list of str"``.
    fix
        Sentence appended to the message that says how to fix it.

    Returns
    -------
    object
        ``value``, unchanged.

    Raises
    ------
    TypeError
        Naming the argument, the value and its type.

    """
    if not isinstance(value, types):
        raise TypeError(f"{argument}={value!r} must be {expected}, found {type(value).__name__}.{_hint(fix)}")
    return value


def check_bool(value: Any, *, argument: str) -> bool:
    """Check that ``value`` is a bool (``numpy.bool_`` included), not a truthy string or number.

    Parameters
    ----------
    value
        The value passed.
    argument
        Name of the argument.

    Returns
    -------
    bool
        ``value`` as a Python bool.

    Raises
    ------
    TypeError
        When it is not a bool.

    """
    check_type(value, (bool, np.bool_), argument=argument, expected="True or False")
    return bool(value)


def check_int(value: Any, *, argument: str, minimum: int | None = None, expected: str = "", fix: str = "") -> int:
    """Check that ``value`` is an int (numpy integers included; not a bool, not ``2.5`` or ``3.0``).

    Parameters
    ----------
    value
        The value passed.
    argument
        Name of the argument.
    minimum
        Smallest allowed value, or ``None``.
    expected
        What is allowed, in words, when ``"an int >= <minimum>"`` does not say it well
        (e.g. ``"a positive int"``).
    fix
        Sentence appended to the message that says how to fix it.

    Returns
    -------
    int
        ``value`` as a Python int.

    Raises
    ------
    TypeError
        When it is not a number (or is a bool).
    ValueError
        When it is a float, or below ``minimum``.

    """
    expected = expected or ("an int" if minimum is None else f"an int >= {minimum}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{argument}={value!r} must be {expected}, found {type(value).__name__}.{_hint(fix)}")
    if not isinstance(value, Integral) or (minimum is not None and value < minimum):
        raise ValueError(f"{argument}={value!r} must be {expected}.{_hint(fix)}")
    return int(value)


def check_positive(value: Any, *, argument: str, allow_zero: bool = False, unit: str = "") -> float:
    """Check that ``value`` is a finite number above zero (or at least zero).

    Parameters
    ----------
    value
        The value passed.
    argument
        Name of the argument.
    allow_zero
        Accept ``0``.
    unit
        Unit of the number, shown in the message (e.g. ``"units of coords"``).

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    TypeError
        When it is not a number (or is a bool).
    ValueError
        When it is NaN, infinite, negative or (unless ``allow_zero``) zero.

    """
    bound = ">= 0" if allow_zero else "> 0"
    what = f"a finite number in {unit}" if unit else "a finite number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{argument}={value!r} must be {bound} ({what}), found {type(value).__name__}.")
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{argument}={value!r} must be {bound} ({what}).")
    return float(value)


def check_int_pair(value: Any, *, argument: str) -> tuple[int, int]:
    """Check a (height, width) pair of positive ints; a single int means a square.

    Parameters
    ----------
    value
        An int or a pair of ints.
    argument
        Name of the argument.

    Returns
    -------
    tuple of int
        ``(height, width)``.

    Raises
    ------
    TypeError
        When it is neither an int nor a sequence.
    ValueError
        When it is not two positive whole numbers.

    """
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
    """Raise ``exc(message)`` unless ``condition`` holds (an ``assert`` that survives ``python -O``).

    For checks that no helper above expresses; the message must name the argument, the value
    found and the fix, as the helpers' messages do.

    Parameters
    ----------
    condition
        What must hold.
    message
        The error message.
    exc
        Exception type to raise.

    Raises
    ------
    Exception
        ``exc(message)`` when ``condition`` is false.

    """
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
