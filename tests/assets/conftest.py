"""Fixtures of the Dagster project's tests: the tiny plate (built once per session) copied into temporary homes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_plate_template(plate_template) -> Path:
    """A 2-well 2-D plate export (64 px, ~12 nuclei per well) with its EXPORT_COMPLETE marker, read-only."""
    return plate_template("tiny", "TINY")


@pytest.fixture
def copy_plate(tiny_plate_template):
    """``copy_plate(dest, marker=True)``: copy the tiny plate to ``dest`` (with or without the marker)."""

    def _copy(dest: Path, *, marker: bool = True) -> Path:
        shutil.copytree(tiny_plate_template, dest)
        if not marker:
            (dest / "EXPORT_COMPLETE").unlink()
        return dest

    return _copy
