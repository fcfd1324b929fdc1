"""The radius graph of the spatial statistics; it lives in :mod:`phenocoder_lib.radius_graph`.

The graph is shared infrastructure: the message passing of the encoding stage builds it as well,
so it sits below every pipeline stage. This module keeps the ``phenocoder_lib.spatial.graph`` names.
"""

from __future__ import annotations

from ..radius_graph import (
    GraphView,
    RadiusGraph,
    brute_force_neighbors,
    build_radius_graph,
    chunk_bounds,
    default_chunks,
    set_num_threads,
)

__all__ = [
    "GraphView",
    "RadiusGraph",
    "brute_force_neighbors",
    "build_radius_graph",
    "chunk_bounds",
    "default_chunks",
    "set_num_threads",
]
