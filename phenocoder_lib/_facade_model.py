"""Facade methods for the model (steps 2-4): being written; replaced by the model module."""

from __future__ import annotations


class ModelMixin:
    """initialize_model, load_model, summarize_model, train, encode."""
