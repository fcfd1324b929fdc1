"""Storage resource: layout, atomic replacement, remote (fsspec) roots, MLflow defaults."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage, resolve_root


def _write(storage, asset, partition, text):
    with storage.stage(asset, partition) as out:
        out.mkdir()
        (out / "data.txt").write_text(text)


def test_default_root_is_dot_phenocoder_in_cwd_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("PHENOCODER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_root(None) == str(tmp_path / ".phenocoder")
    monkeypatch.setenv("PHENOCODER_HOME", str(tmp_path / "elsewhere"))
    assert PhenocoderStorage().root_url == str(tmp_path / "elsewhere")
    assert PhenocoderStorage(root=str(tmp_path / "cfg")).root_url == str(tmp_path / "cfg")  # config wins
    assert PhenocoderStorage().landing_dir == tmp_path / "elsewhere" / "incoming"
    assert resolve_root("s3://bucket/prefix/") == "s3://bucket/prefix"


def test_one_folder_per_asset_and_partition(tmp_path):
    storage = PhenocoderStorage(root=str(tmp_path))
    _write(storage, "latents", "P1_A01", "a")
    _write(storage, "model", None, "m")
    assert (tmp_path / "latents" / "P1_A01" / "data.txt").read_text() == "a"
    assert (tmp_path / "model" / "_" / "data.txt").read_text() == "m"
    assert storage.partitions("latents") == ["P1_A01"]
    assert storage.exists("model") and not storage.exists("latents", "P1_A02")
    with pytest.raises(FileNotFoundError, match="materialize 'latents' for 'P1_A02' first"):
        storage.local_path("latents", "P1_A02")
    with pytest.raises(ValueError):
        storage.url("latents", "../escape")


def test_failed_write_keeps_the_previous_result(tmp_path):
    storage = PhenocoderStorage(root=str(tmp_path))
    _write(storage, "patches", "P1_A01", "first")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.stage("patches", "P1_A01") as out:
            out.mkdir()
            (out / "data.txt").write_text("half-writ")
            raise RuntimeError("boom")
    assert (tmp_path / "patches" / "P1_A01" / "data.txt").read_text() == "first"
    assert [p.name for p in (tmp_path / "patches").iterdir()] == ["P1_A01"]  # no staging leftovers
    _write(storage, "patches", "P1_A01", "second")
    assert (tmp_path / "patches" / "P1_A01" / "data.txt").read_text() == "second"
    assert [p.name for p in (tmp_path / "patches").iterdir()] == ["P1_A01"]


def test_fsspec_root_round_trip():
    root = f"memory://phenocoder-{uuid.uuid4().hex[:8]}"
    storage = PhenocoderStorage(root=root)
    assert not storage.is_local
    _write(storage, "graph_stats", "P1_A01", "v1")
    _write(storage, "graph_stats", "P1_A01", "v2")
    local = storage.local_path("graph_stats", "P1_A01")
    assert isinstance(local, Path) and (local / "data.txt").read_text() == "v2"
    assert storage.partitions("graph_stats") == ["P1_A01"]
    with pytest.raises(ValueError, match="landing"):
        _ = storage.landing_dir
    with pytest.raises(ValueError, match="tracking_uri"):
        MLflowTracking(root=root).resolved_tracking_uri()


def test_mlflow_defaults_live_under_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("PHENOCODER_HOME", str(tmp_path))
    tracking = MLflowTracking()
    assert tracking.resolved_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.resolved_artifact_location() == (tmp_path / "mlartifacts").as_uri()
    server = MLflowTracking(tracking_uri="http://mlflow.example:5000")
    assert server.resolved_tracking_uri() == "http://mlflow.example:5000"
    assert server.resolved_artifact_location() is None
