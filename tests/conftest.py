"""Shared fixtures: small seeded synthetic plates built once per test session, and the real plate."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLATE_3D = Path(os.environ.get("PHENOCODER_PLATE_3D", REPO.parent / "shared" / "data" / "plate_3d"))
#: Physical scale of the real plate: 4x-downsampled images of 0.322 um pixels, 10 um z-step.
PLATE_3D_GEOMETRY = {"pixel_size_um": 1.288, "z_step_um": 10.0, "table_scale": 4.0}

warnings.filterwarnings("ignore", message="zarr v3 autosharding")


@pytest.fixture(scope="session")
def plate_3d_path() -> Path:
    """The real confocal plate (3 wells); tests using it are skipped where it is absent."""
    if not (PLATE_3D / "imgs").is_dir():
        pytest.skip(f"real plate not found at {PLATE_3D}")
    return PLATE_3D


@pytest.fixture(scope="session")
def plate_3d_geometry() -> dict[str, float]:
    return dict(PLATE_3D_GEOMETRY)


@pytest.fixture(scope="session")
def synthetic_plate_3d(tmp_path_factory) -> Path:
    """A 3-well 3-D uint8 synthetic plate export (about 100 nuclei per well)."""
    from phenocoder_lib.synthetic import make_synthetic_plate

    root = tmp_path_factory.mktemp("plates") / "synth3d"
    make_synthetic_plate(root, n_wells=3, ndim=3, image_size=160, n_z=5, nuclei_per_well=100, seed=1)
    return root


@pytest.fixture(scope="session")
def synthetic_plate_2d(tmp_path_factory) -> Path:
    """A 2-well 2-D uint16 synthetic plate export with 3 channels."""
    from phenocoder_lib.synthetic import make_synthetic_plate

    root = tmp_path_factory.mktemp("plates") / "synth2d"
    make_synthetic_plate(root, n_wells=2, ndim=2, n_channels=3, image_size=128, nuclei_per_well=50,
                         dtype="uint16", seed=2)
    return root


def _folder_digest(folder: Path) -> str:
    """SHA-256 over the relative names and bytes of every file under ``folder``."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def folder_digest():
    """``folder_digest(path)``: a content hash of a folder, to check that a failed call left it byte-identical."""
    return _folder_digest
