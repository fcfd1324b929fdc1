"""Fixtures of the Dagster project's tests: tiny plates built once and copied into temporary homes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_plate_template(tmp_path_factory) -> Path:
    """A 2-well 2-D plate export (64 px, ~12 nuclei per well) with its EXPORT_COMPLETE marker."""
    from phenocoder_lib.synthetic import make_synthetic_plate

    root = tmp_path_factory.mktemp("tiny") / "TINY"
    make_synthetic_plate(root, n_wells=2, ndim=2, n_channels=2, image_size=64, nuclei_per_well=12, seed=3)
    return root


@pytest.fixture
def copy_plate(tiny_plate_template):
    """``copy_plate(dest, marker=True)``: copy the tiny plate to ``dest`` (with or without the marker)."""

    def _copy(dest: Path, *, marker: bool = True) -> Path:
        shutil.copytree(tiny_plate_template, dest)
        if not marker:
            (dest / "EXPORT_COMPLETE").unlink()
        return dest

    return _copy
