"""Spatial message passing; it lives in :mod:`phenocoder_lib.message_passing`.

Message passing runs in the encoding stage (``encode(spatial_message_passing_radius=...)``), which
comes before the spatial statistics in the pipeline; this module keeps the
``phenocoder_lib.spatial.message_passing`` name.
"""

from __future__ import annotations

from ..message_passing import spatial_message_passing

__all__ = ["spatial_message_passing"]
