"""Named warnings of the spatial statistics (filter them with ``warnings.filterwarnings``)."""

from __future__ import annotations


class SpatialStatsWarning(UserWarning):
    """A sample or subunit was skipped (no objects, one cluster, no cube kept); the result names it."""


class EmbeddingWarning(UserWarning):
    """The embedding changed a setting to make it computable (UMAP initialisation, dimensions, keys)."""
