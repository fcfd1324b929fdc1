"""Imports with side effects kept in check."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


def import_scanpy() -> ModuleType:
    """Import scanpy without letting umap import TensorFlow.

    ``umap/__init__`` imports ``umap.parametric_umap``, which imports TensorFlow (10-20 s and several
    hundred MB) whenever TensorFlow is installed, although clustering and UMAP never use it. Unless
    TensorFlow is already loaded, umap is initialised with that submodule blocked (see
    :func:`parametric_umap_blocked`), so ``import umap.parametric_umap`` still works afterwards.
    """
    with parametric_umap_blocked(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)  # "Tensorflow not installed; ParametricUMAP unavailable"
        import umap

        umap.UMAP  # noqa: B018 - runs a deferred umap/__init__ (phenocoder_lib.umap_layout) inside the block
    import scanpy

    return scanpy


@contextmanager
def parametric_umap_blocked() -> Iterator[None]:
    """Keep ``umap/__init__`` from importing TensorFlow within the block.

    ``import umap.parametric_umap`` fails in the block (umap's ``__init__`` handles the ImportError with an
    ImportWarning, which Python ignores by default) unless TensorFlow is already loaded. Afterwards the
    block is lifted. The warnings filters are not touched (they are not thread-safe).
    """
    if "tensorflow" in sys.modules or "umap.parametric_umap" in sys.modules:
        yield
        return
    blocked = "umap.parametric_umap"
    sys.modules[blocked] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(blocked, 0) is None:
            del sys.modules[blocked]
