"""Shared fixtures: small seeded synthetic plates and a trained model built once per test process, the real plate."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PLATE_3D = Path(os.environ.get("PHENOCODER_PLATE_3D", REPO.parent / "shared" / "data" / "plate_3d"))
#: Physical scale of the real plate: 4x-downsampled images of 0.322 um pixels, 10 um z-step.
PLATE_3D_GEOMETRY = {"pixel_size_um": 1.288, "z_step_um": 10.0, "table_scale": 4.0}

warnings.filterwarnings("ignore", message="zarr v3 autosharding")
# Step retries wait 10 s, then 20 s, by default: the tests that expect a step to fail (damaged files, a
# failing well) need the retries, not the waiting. Read when phenocoder_assets.wells is first imported.
os.environ.setdefault("PHENOCODER_STEP_RETRY_DELAY", "0.1")


@pytest.fixture(scope="session")
def plate_3d_path() -> Path:
    """The real confocal plate (3 wells); tests using it are skipped where it is absent."""
    if not (PLATE_3D / "imgs").is_dir():
        pytest.skip(f"real plate not found at {PLATE_3D}")
    return PLATE_3D


@pytest.fixture(scope="session")
def plate_3d_geometry() -> dict[str, float]:
    return dict(PLATE_3D_GEOMETRY)


#: Every synthetic plate the tests read, by kind. Each kind is written once per test session (once per
#: pytest-xdist worker) and is read-only: a test that changes a plate's files works on a copy.
PLATE_SPECS: dict[str, dict] = {
    # 3-D uint8, 3 wells of about 100 nuclei: ingest, patches, the standalone spatial path
    "synth3d": dict(n_wells=3, ndim=3, image_size=160, n_z=5, nuclei_per_well=100, seed=1),
    # 2-D uint16, 2 wells, 3 channels
    "synth2d": dict(n_wells=2, ndim=2, n_channels=3, image_size=128, nuclei_per_well=50, dtype="uint16", seed=2),
    # 2-D uint8, 2 channels, 2 wells of 12 nuclei: the Dagster assets, the bad-input catalogues, kill tests
    "tiny": dict(n_wells=2, ndim=2, n_channels=2, image_size=64, nuclei_per_well=12, seed=3),
    # 3-D uint8, 2 channels, 1 well of 3 slices; 2-D uint16, 1 well: the bad-input catalogue
    "tiny3d": dict(n_wells=1, ndim=3, n_channels=2, image_size=48, n_z=3, nuclei_per_well=10, seed=4),
    "tiny16": dict(n_wells=1, ndim=2, n_channels=2, image_size=48, nuclei_per_well=8, dtype="uint16", seed=5),
    # 3-D uint8, 4 channels, 2 wells of 36 nuclei: training input pipeline and encoding
    "small": dict(n_wells=2, image_size=96, nuclei_per_well=36, seed=1),
    # 3-D uint8, 4 channels, 2 wells of 60 nuclei: models trained through the facade
    "model": dict(n_wells=2, image_size=128, nuclei_per_well=60, seed=0),
}


@pytest.fixture(scope="session")
def plate_template(tmp_path_factory):
    """``plate_template(kind, name=kind)``: the read-only folder ``.../name`` of a synthetic plate of ``kind``.

    The folder name is the plate id (samples are ``f"{name}_{well}"``); a kind asked for under a second
    name is a copy of the first (the files do not depend on the name).
    """
    base = tmp_path_factory.mktemp("plates")
    built: dict[tuple[str, str], Path] = {}

    def get(kind: str, name: str | None = None) -> Path:
        name = name or kind
        if (kind, name) not in built:
            dest = base / kind / name
            first = next((path for (k, _), path in built.items() if k == kind), None)
            if first is None:
                from phenocoder_lib.synthetic import make_synthetic_plate

                make_synthetic_plate(dest, **PLATE_SPECS[kind])
            else:
                shutil.copytree(first, dest)
            built[(kind, name)] = dest
        return built[(kind, name)]

    return get


@pytest.fixture
def plate_copy(plate_template, tmp_path):
    """``plate_copy(kind, dest=None, name=kind)``: a writable copy of a synthetic plate (default ``tmp_path/name``)."""

    def _copy(kind: str, dest: Path | None = None, name: str | None = None) -> Path:
        dest = Path(dest) if dest is not None else tmp_path / (name or kind)
        return Path(shutil.copytree(plate_template(kind, name), dest))

    return _copy


@pytest.fixture
def plate_scans(monkeypatch) -> list[tuple]:
    """The calls of ``phenocoder_lib.ingest.scan_plate`` made during the test (their positional arguments)."""
    import phenocoder_lib.ingest as ingest

    calls: list[tuple] = []
    real_scan = ingest.scan_plate

    def counted(*args, **kwargs):
        calls.append(args)
        return real_scan(*args, **kwargs)

    monkeypatch.setattr(ingest, "scan_plate", counted)
    return calls


@pytest.fixture(scope="session")
def synthetic_plate_3d(plate_template) -> Path:
    """A 3-well 3-D uint8 synthetic plate export (about 100 nuclei per well), read-only."""
    return plate_template("synth3d")


@pytest.fixture(scope="session")
def synthetic_plate_2d(plate_template) -> Path:
    """A 2-well 2-D uint16 synthetic plate export with 3 channels, read-only."""
    return plate_template("synth2d")


@dataclass(frozen=True)
class TrainedCVAE:
    """The plate -> dataset -> trained model chain of :func:`trained_cvae` (read-only: load, never write)."""

    plate_root: Path  #: the synthetic plate (kind ``"model"``: 2 wells of 60 nuclei, 4 channels, 3-D)
    data_dir: Path  #: its dataset ``d1`` (16 x 16 patches, metadata ``well``) and the model under ``models/``
    model_dir: Path  #: the trained plain CVAE's folder (model, checkpoint, config, history, previews)
    history: dict  #: what ``train`` returned
    latents: Any  #: ``encode(spatial_message_passing_radius=15.0)`` right after training (AnnData)


#: The small architecture the facade tests train: 16 x 16 x 4 patches, two conv layers.
TRAINED_ARCH = dict(input_shape=(16, 16, 4), conv_layers=(8, 16), batch_size=32)


@pytest.fixture(scope="session")
def trained_cvae(plate_template, tmp_path_factory) -> TrainedCVAE:
    """A plain CVAE (4 latent, 16 dense dims) trained 2 epochs on the ``model`` plate through the facade, seed 0.

    Built once per test process and shared: tests load it into a fresh facade (``Phenocoder.load_model``) and
    must not train or write into its folders (a test that continues training trains its own model).
    """
    from phenocoder_lib import Phenocoder
    from phenocoder_lib.ingest import read_plate

    root = plate_template("model", "plate")
    p = Phenocoder(sdata=read_plate(root), seed=0)
    p.generate_dataset("d1", tmp_path_factory.mktemp("trained_cvae"), patch_size=16, metadata_keys=["well"],
                       progress=False)
    p.initialize_model(4, 16, [], flip=True, **TRAINED_ARCH)
    history = p.train(n_epochs=2, verbose=0, n_preview=20)
    latents = p.encode(progress=False, spatial_message_passing_radius=15.0).copy()
    return TrainedCVAE(root, Path(p.data_dir), Path(p.model_dir), history, latents)


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


#: The test files that take longest, longest first (from ``--durations`` on two workers). They are
#: collected first, so that with ``-n 2 --dist loadfile`` (files in collection order, see pyproject.toml)
#: both workers start on them and finish on the many short files together.
LONGEST_FIRST = (
    "tests/test_benchmarks.py",  # the benchmark suite's smoke run
    "tests/assets/test_soak.py",
    "tests/lib/test_clustering_scale.py",  # pynndescent's JIT, two fresh processes
    "tests/assets/test_platform.py",  # the session's demo run, its web server and retraining
    "tests/lib/test_environment.py",
    "tests/assets/test_reliability.py",
    "tests/assets/test_bad_input_assets.py",
    "tests/lib/test_durability.py",
    "tests/lib/test_model_roundtrip.py",
    "tests/lib/test_evaluation.py",
    "tests/assets/test_dask.py",
    "tests/lib/test_model_workflow.py",
    "tests/lib/test_embedding.py",
    "tests/lib/test_bad_input_model.py",
    "tests/lib/test_patches.py",
    "tests/lib/test_training.py",
    "tests/lib/test_model.py",
)


def pytest_collection_modifyitems(config, items):
    """Collect the longest test files first (stable: the others keep their order)."""

    def rank(item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix + "::")),
                    len(LONGEST_FIRST))

    items.sort(key=rank)
