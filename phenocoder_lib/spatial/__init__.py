"""Spatial graphs and statistics: radius graphs, the six statistic groups, subunits, message passing.

Submodules are imported lazily (PEP 562) so that importing this package does not load numba.

- :func:`build_radius_graph` (:mod:`phenocoder_lib.radius_graph`, also as :mod:`.graph`): inclusive-radius
  graph in spatial order, several radii.
- :func:`sample_spatial_stats` (:mod:`.stats`): one sample (AnnData) in, one named row out.
- :func:`compute_spatial_stats` (:mod:`.driver`): every sample or subunit of a table, as an AnnData.
- :func:`partition_subunits` (:mod:`.subunits`): cubes on a grid shared by all samples.
- :func:`well_arrangement` (:mod:`.neighbourhood`): cell types fitted on the control wells, neighbourhood
  composition, co-occurrence and radial statistics per well.
- :func:`spatial_message_passing` (:mod:`phenocoder_lib.message_passing`, also as :mod:`.message_passing`):
  mean over self and neighbours; it runs in the encoding stage.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..warnings import EmbeddingWarning, SpatialStatsWarning

_LAZY = {
    "build_radius_graph": ".graph",
    "RadiusGraph": ".graph",
    "GraphView": ".graph",
    "sample_spatial_stats": ".stats",
    "feature_names": ".stats",
    "enrichment_moments": ".stats",
    "VALID_STATS": ".stats",
    "compute_spatial_stats": ".driver",
    "partition_subunits": ".subunits",
    "subunit_indices": ".subunits",
    "spatial_message_passing": ".message_passing",
    "fit_cell_types": ".neighbourhood",
    "neighbourhood_composition": ".neighbourhood",
    "arrangement_features": ".neighbourhood",
    "well_arrangement": ".neighbourhood",
}

__all__ = ["EmbeddingWarning", "SpatialStatsWarning", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
