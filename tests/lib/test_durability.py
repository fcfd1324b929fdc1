"""Nothing lost: library writes killed with SIGKILL leave the previous result intact; a rerun succeeds.

Each test writes a result, hashes it, starts the same write again in a child process
(``_kill_child.py``), kills it with SIGKILL while the write is under way, and checks that the previous
result is byte-identical, that the leftovers are hidden temporary siblings that readers ignore (and the
next write removes once stale) and that writing again succeeds. The training test kills a real
training after some epochs and resumes it from the best checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phenocoder_lib import io as pio
from phenocoder_lib.ingest import read_plate, write_sdata

CHILD = Path(__file__).with_name("_kill_child.py")
TIMEOUT = 300  # seconds for a child to reach the kill point on a loaded 2-core machine


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-1 of every file under ``folder`` by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def start_child(scenario: str, log: Path, **args) -> subprocess.Popen:
    """Start ``_kill_child.py scenario``; its output goes to ``log`` (a pipe could fill and block it)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(CHILD), scenario, json.dumps(args)],
                                stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def kill_when(proc: subprocess.Popen, condition, what: str) -> None:
    """Poll ``condition()`` until true, then SIGKILL ``proc``; fail if the child exits first."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if proc.poll() is not None:
            tail = Path(proc.log).read_text(errors="replace")[-3000:]
            raise AssertionError(f"child exited ({proc.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def hidden_siblings(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


@pytest.fixture(scope="module")
def plate_root(plate_template) -> Path:
    return plate_template("tiny", "P1")


def test_killed_patch_write_keeps_the_previous_dataset(plate_root, tmp_path):
    from phenocoder_lib.patches import PatchDataset, generate_dataset

    sd = read_plate(plate_root)
    kwargs = dict(table_key="nuclei_features", sample_key="sample", image_key="IF", patch_size=16)
    target = tmp_path / "d"
    generate_dataset(sd, dataset="d", dir_dataset=tmp_path, **kwargs)
    before = tree_hashes(target)
    assert {"index.parquet", "stats.parquet", "settings.json"} <= set(before)

    ready = tmp_path / "ready"
    proc = start_child("patches", tmp_path / "child.log", plate=str(plate_root), dir=str(tmp_path), dataset="d",
                       ready=str(ready))
    kill_when(proc, ready.exists, "the index write")
    # killed mid-write: the new store is half-written in a temporary sibling, the target is untouched
    leftovers = hidden_siblings(target)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name
    assert (leftovers[0] / "patches.zarr").is_dir() and not (leftovers[0] / "settings.json").exists()
    assert tree_hashes(target) == before
    assert len(PatchDataset.open(target).index) == sd.tables["nuclei_features"].n_obs

    # the leftover is a hidden name (readers never see it); a stale one is removed by the next write
    os.utime(leftovers[0], (time.time() - 2 * pio.STALE_SECONDS,) * 2)
    generate_dataset(sd, dataset="d", dir_dataset=tmp_path, **kwargs)
    assert hidden_siblings(target) == []
    assert tree_hashes(target) == before  # same input, same bytes


def test_killed_sdata_write_keeps_the_previous_table_and_images(plate_root, tmp_path):
    import spatialdata

    sd = read_plate(plate_root)
    target = tmp_path / "plate.zarr"
    write_sdata(sd, target)
    before = tree_hashes(target)

    ready = tmp_path / "ready"
    proc = start_child("sdata", tmp_path / "child.log", plate=str(plate_root), path=str(target), ready=str(ready))
    kill_when(proc, ready.exists, "the rename into place")
    leftovers = hidden_siblings(target)
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0].name
    assert any((leftovers[0] / name).exists() for name in ("zarr.json", ".zgroup"))  # written, not renamed
    assert tree_hashes(target) == before
    table = spatialdata.read_zarr(target).tables["nuclei_features"]
    assert table.n_obs == sd.tables["nuclei_features"].n_obs

    write_sdata(sd, target)  # rerun: succeeds; the young leftover is kept (it could be a live write)
    assert spatialdata.read_zarr(target).tables["nuclei_features"].n_obs == table.n_obs
    assert [p.name for p in hidden_siblings(target)] == [leftovers[0].name]


def test_replace_dir_never_leaves_the_target_missing(tmp_path):
    """The rename that commits a folder is one atomic exchange; the fallback is repaired on the next write."""
    target = tmp_path / "out"
    for text in ("old", "new"):
        with pio.atomic_dir(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (target / "f").read_text() == "new" and hidden_siblings(target) == []
    # a process killed between the two renames of the fallback leaves the old folder aside: restored
    aside = tmp_path / ".out.old-0123456789"
    os.replace(target, aside)
    pio.recover(target)
    assert (target / "f").read_text() == "new" and not aside.exists()


@pytest.mark.slow
def test_killed_training_keeps_the_model_and_resumes_from_its_best_checkpoint(plate_root, tmp_path):
    import keras

    from phenocoder_lib import Phenocoder
    from phenocoder_lib import training as T
    from phenocoder_lib.models import CVAE

    model_args = dict(n_latent_dim=4, n_dense_dim=16, conditions=[], batch_size=16, input_shape=(16, 16, 2),
                      conv_layers=(8, 16), dropout=None)
    pheno = Phenocoder(sdata=read_plate(plate_root), seed=0)
    pheno.generate_dataset(dataset="d", dir_dataset=tmp_path, patch_size=(16, 16))
    pheno.initialize_model(**model_args)
    pheno.train(n_epochs=1, plot=False, verbose=0)  # the previous, complete model
    model_dir = Path(pheno.model_dir)
    model_bytes = (model_dir / "model.keras").read_bytes()

    started = time.time()
    proc = start_child("train", tmp_path / "child.log", dir=str(tmp_path), dataset="d", model=model_args)
    record = model_dir / "checkpoint.json"

    def epochs_done() -> int:
        try:
            if record.stat().st_mtime < started:
                return 0
            return len(json.loads((model_dir / "history.json").read_text()).get("loss", []))
        except (OSError, ValueError):
            return 0

    kill_when(proc, lambda: epochs_done() >= 3, "three epochs with a checkpoint")
    # the model of the earlier training is untouched; the killed run's best checkpoint loads in safe mode
    assert (model_dir / "model.keras").read_bytes() == model_bytes
    state = T.checkpoint_state(model_dir)
    assert 1 <= state["epoch"] <= epochs_done()
    assert state["history"]["epoch"] == [float(e) for e in range(1, state["epoch"] + 1)]
    restored = keras.saving.load_model(model_dir / "checkpoint.keras", safe_mode=True, compile=False)
    assert isinstance(restored, CVAE)
    fresh = Phenocoder(seed=0)
    fresh.load_model(model_dir / "checkpoint.keras")  # the documented way to use it
    assert fresh.model.count_params() == restored.count_params()

    # resume in a new object: epochs continue from the checkpoint, history is kept, model.keras is written
    again = Phenocoder(seed=0)
    again.data_dir, again.datasets = tmp_path, ["d"]
    again.initialize_model(**model_args)
    assert again.model_dir == model_dir  # same parameters, same folder
    total = state["epoch"] + 2
    history = again.train(n_epochs=total, plot=False, verbose=0, resume=True)
    assert history["epoch"] == [float(e) for e in range(1, total + 1)]
    assert history["loss"][:state["epoch"]] == state["history"]["loss"]
    assert (model_dir / "model.keras").read_bytes() != model_bytes
    assert json.loads((model_dir / "checkpoint.json").read_text())["epoch"] <= total
    assert min(history["val_loss"]) <= state["val_loss"]
    assert keras.saving.load_model(model_dir / "model.keras", safe_mode=True, compile=False) is not None


def test_checkpoint_state_after_a_kill_between_checkpoint_and_its_record(tmp_path):
    """Killed after the .keras file but before its .json record: the epoch comes from the history."""
    (tmp_path / "checkpoint.keras").write_bytes(b"new checkpoint")
    (tmp_path / "checkpoint.json").write_text(json.dumps({"epoch": 1, "sha1": "stale", "val_loss": 3.0,
                                                         "learning_rate": 0.001}))
    history = {"loss": [4.0, 3.0, 2.5], "val_loss": [3.0, 2.0, 2.2], "learning_rate": [1e-3, 1e-3, 2e-4],
               "epoch": [1.0, 2.0, 3.0]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    state = _checkpoint_state(tmp_path)
    assert state["epoch"] == 2 and state["val_loss"] == 2.0 and state["history"]["loss"] == [4.0, 3.0]
    # with a matching record the record decides
    sha = hashlib.sha1(b"new checkpoint").hexdigest()
    (tmp_path / "checkpoint.json").write_text(json.dumps({"epoch": 1, "sha1": sha, "val_loss": 3.0,
                                                         "learning_rate": 0.001}))
    assert _checkpoint_state(tmp_path)["epoch"] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _checkpoint_state(tmp_path / "nothing")


def _checkpoint_state(folder):
    from phenocoder_lib.training import checkpoint_state

    return checkpoint_state(folder)
