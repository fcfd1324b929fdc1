"""Fixtures of the Dagster project's tests: the tiny plate (built once per session) copied into temporary homes."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest
from _instances import DEMO_DAGSTER_YAML, write_instance


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


DEMO_EPOCHS = 3


_DEMOS: dict = {}


def _demo(backend: str, tmp_path_factory):
    """The demo on a small plate in a temporary home (3 wells, 16x16 patches, 3 epochs), once per backend."""

    from phenocoder_assets.cli import print_instructions, run_demo

    if backend in _DEMOS:
        return _DEMOS[backend]
    home = tmp_path_factory.mktemp(f"platform-{backend}") / "home"
    write_instance(home / "dagster", backend, DEMO_DAGSTER_YAML)
    saved = {k: os.environ.get(k) for k in ("PHENOCODER_HOME", "DAGSTER_HOME")}
    os.environ.pop("DAGSTER_HOME", None)  # the demo's own instance folder <home>/dagster
    try:
        result = run_demo(home, wells=3, epochs=DEMO_EPOCHS, patch_size=16, image_size=128, nuclei_per_well=50,
                          quiet=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_instructions(result)
        result.printed = out.getvalue()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    _DEMOS[backend] = result
    return result


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def demo(request, tmp_path_factory):
    """The session's demo materialization on each instance backend (shared by test_platform.py)."""
    return _demo(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def demo_sqlite(tmp_path_factory):
    """The demo on the embedded SQLite instance only (the same run as ``demo[sqlite]``)."""
    return _demo("sqlite", tmp_path_factory)
