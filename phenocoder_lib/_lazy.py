"""Imports with side effects kept in check."""

from __future__ import annotations

import sys
from types import ModuleType


def import_scanpy() -> ModuleType:
    """Import scanpy without letting umap import TensorFlow.

    ``umap/__init__`` imports ``umap.parametric_umap``, which imports TensorFlow (10-20 s and several
    hundred MB) whenever TensorFlow is installed, although clustering and UMAP never use it. Unless
    TensorFlow is already loaded, umap is imported with that submodule blocked (umap handles the
    ImportError); the block is lifted afterwards, so ``import umap.parametric_umap`` still works.
    """
    if "umap" not in sys.modules and "tensorflow" not in sys.modules:
        blocked = "umap.parametric_umap"
        had = blocked in sys.modules
        previous = sys.modules.get(blocked)
        sys.modules[blocked] = None  # type: ignore[assignment]
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ImportWarning)
                import umap  # noqa: F401
        finally:
            if had:
                sys.modules[blocked] = previous  # type: ignore[assignment]
            else:
                del sys.modules[blocked]
    import scanpy

    return scanpy
