"""Row positions per group in one pass (O(n log n), not one scan of the table per group)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def group_rows(values: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """Unique ``values`` in order of first appearance and, for each, its row positions (ascending).

    ``values`` must have no missing entries (callers validate that first).
    """
    codes, uniques = pd.factorize(np.asarray(values))
    order = np.argsort(codes, kind="stable")
    return uniques, np.split(order, np.cumsum(np.bincount(codes, minlength=len(uniques)))[:-1])
