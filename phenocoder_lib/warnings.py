"""Every named warning of the library, in one place.

Filter them by class, e.g. ``warnings.filterwarnings("ignore", category=SpatialStatsWarning)``; each class is
also importable from the module that raises it.
"""

from __future__ import annotations

__all__ = [
    "ConstantChannelWarning",
    "EmbeddingWarning",
    "ModelSchemaWarning",
    "SpatialStatsWarning",
    "UnseenConditionWarning",
]


class ConstantChannelWarning(UserWarning):
    """A channel has no intensity range in the patches; it normalizes to zeros."""


class ModelSchemaWarning(UserWarning):
    """A model folder written with an older ``model_config.json`` schema was migrated when loaded."""


class UnseenConditionWarning(UserWarning):
    """Condition values at inference that training never saw (all-zero one-hot or clipped)."""


class SpatialStatsWarning(UserWarning):
    """A sample or subunit was skipped (no objects, one cluster, no cube kept); the result names it."""


class EmbeddingWarning(UserWarning):
    """The embedding changed a setting to make it computable (UMAP initialisation, dimensions, keys)."""
