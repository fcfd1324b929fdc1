"""The landing-folder sensor: new plates -> partitions + run requests, idempotent, safe names only."""

from __future__ import annotations

import json
import os

import pytest
from _instances import make_instance  # noqa: F401 (fixture: SQLite, and PostgreSQL when configured)
from dagster import AssetKey, build_sensor_context

from phenocoder_assets.partitions import partition_key_problem, split_sample, validate_partition_key
from phenocoder_assets.resources import PhenocoderStorage
from phenocoder_assets.sensors import MARKER, incoming_plates_sensor


@pytest.fixture(autouse=True)
def _one_run_per_well(monkeypatch):
    """These tests read the per-well requests (PHENOCODER_SENSOR_RUNS=well); plate runs: test_batching.py."""
    monkeypatch.setenv("PHENOCODER_SENSOR_RUNS", "well")


def _evaluate(instance, home, cursor=None):
    ctx = build_sensor_context(instance=instance, cursor=cursor,
                               resources={"storage": PhenocoderStorage(root=str(home))})
    return incoming_plates_sensor(ctx)


def _apply(instance, result):
    for req in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))


def _pretend_materialized(storage, request, **extra):
    """Write the summary.json files that the assets write, as if the requested run had succeeded."""
    sample, digest, _ = request.run_key.split(":", 2)
    records = {"sdata": {"source_digest": digest}, **extra}
    for asset, summary in records.items():
        with storage.stage(asset, sample) as out:
            out.mkdir()
            (out / "summary.json").write_text(json.dumps(summary))


def test_marker_name_matches_library():
    from phenocoder_lib.ingest import EXPORT_COMPLETE_MARKER

    assert MARKER == EXPORT_COMPLETE_MARKER


def test_new_plate_registers_wells_and_requests_runs_once(make_instance, tmp_path, copy_plate):
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "PLATE1")
    with make_instance() as instance:
        first = _evaluate(instance, home)
        assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["PLATE1_A01", "PLATE1_A02"]]
        assert first.dynamic_partitions_requests[0].partitions_def_name == "samples"
        reqs = first.run_requests
        assert [r.partition_key for r in reqs] == ["PLATE1_A01", "PLATE1_A02"]
        # no model yet: only the stages that can run
        assert all(r.asset_selection == [AssetKey("sdata"), AssetKey("patches")] for r in reqs)
        assert len({r.run_key for r in reqs}) == 2
        assert all(r.run_key.startswith(f"{r.partition_key}:") for r in reqs)
        assert all(r.job_name in (None, "sample_pipeline") for r in reqs)
        _apply(instance, first)
        assert sorted(instance.get_dynamic_partitions("samples")) == ["PLATE1_A01", "PLATE1_A02"]

        # the same landing folder again: nothing new
        second = _evaluate(instance, home, cursor=first.cursor)
        assert not second.run_requests
        assert not second.dynamic_partitions_requests
        assert "no new or changed plates" in second.skip_reason.skip_message

        # without a cursor the run keys are the same, so Dagster would not launch them twice
        again = _evaluate(instance, home)
        assert [r.run_key for r in again.run_requests] == [r.run_key for r in reqs]
        assert not again.dynamic_partitions_requests  # partitions already registered


def test_changed_well_runs_again(make_instance, tmp_path, copy_plate):
    home = tmp_path / "home"
    plate = copy_plate(home / "incoming" / "PLATE1")
    storage = PhenocoderStorage(root=str(home))
    with make_instance() as instance:
        first = _evaluate(instance, home)
        _apply(instance, first)
        for req in first.run_requests:
            _pretend_materialized(storage, req)
        table = plate / "tables" / "A02.csv"
        table.write_text(table.read_text())  # re-exported: new mtime
        os.utime(table, ns=(table.stat().st_atime_ns, table.stat().st_mtime_ns + 10**9))
        os.utime(plate / MARKER, ns=(0, 10**9))
        second = _evaluate(instance, home, cursor=first.cursor)
        assert [r.partition_key for r in second.run_requests] == ["PLATE1_A02"]
        assert second.run_requests[0].run_key != first.run_requests[1].run_key


def test_incomplete_plate_waits_until_marker(make_instance, tmp_path, copy_plate):
    home = tmp_path / "home"
    plate = copy_plate(home / "incoming" / "PLATE2", marker=False)
    with make_instance() as instance:
        waiting = _evaluate(instance, home)
        assert not waiting.run_requests and not waiting.dynamic_partitions_requests
        assert "PLATE2" in waiting.skip_reason.skip_message and MARKER in waiting.skip_reason.skip_message
        (plate / MARKER).write_text("")
        done = _evaluate(instance, home, cursor=waiting.cursor)
        assert [r.partition_key for r in done.run_requests] == ["PLATE2_A01", "PLATE2_A02"]


def test_quiet_period(make_instance, tmp_path, copy_plate, monkeypatch):
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "PLATE3")
    monkeypatch.setenv("PHENOCODER_QUIET_SECONDS", "3600")
    with make_instance() as instance:
        result = _evaluate(instance, home)
        assert not result.run_requests
        assert "quiet period" in result.skip_reason.skip_message


def test_unsafe_names_and_symlinks_are_refused(make_instance, tmp_path, copy_plate):
    home = tmp_path / "home"
    landing = home / "incoming"
    outside = copy_plate(tmp_path / "OUTSIDE")
    copy_plate(landing / "bad..name")
    copy_plate(landing / "comma,plate")
    (landing / "LINKED").symlink_to(outside, target_is_directory=True)
    inner = copy_plate(landing / "SNEAKY")
    victim = next((inner / "imgs").iterdir())
    victim.unlink()
    victim.symlink_to(next((outside / "imgs").iterdir()))
    (landing / "notes.txt").write_text("not a plate")
    with make_instance() as instance:
        result = _evaluate(instance, home)
    assert not result.run_requests
    assert not result.dynamic_partitions_requests
    message = result.skip_reason.skip_message
    assert "bad..name" in message and "comma,plate" in message and "LINKED" in message
    assert "symbolic link" in message


def test_stages_follow_the_model_and_the_cluster_reference(make_instance, tmp_path, copy_plate):
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "PLATE1")
    storage = PhenocoderStorage(root=str(home))
    with make_instance() as instance:
        first = _evaluate(instance, home)
        _apply(instance, first)
        for req in first.run_requests:
            _pretend_materialized(storage, req)
        assert not _evaluate(instance, home).run_requests  # materialized, even without the cursor

        # a model: the wells already ingested are encoded, new wells get patches like the model's
        with storage.stage("model") as out:
            out.mkdir()
            (out / "model_info.json").write_text(json.dumps({
                "registered_model_name": "m", "version": "3", "patches": {"patch_size": [32, 32], "scale": True}}))
        second = _evaluate(instance, home, cursor=first.cursor)
        assert [r.asset_selection for r in second.run_requests] == [[AssetKey("latents")]] * 2
        for req in second.run_requests:
            _pretend_materialized(storage, req, latents={"model": "m/3"})
        copy_plate(home / "incoming" / "PLATE9")
        third = _evaluate(instance, home, cursor=second.cursor)
        assert [r.partition_key for r in third.run_requests] == ["PLATE9_A01", "PLATE9_A02"]
        assert third.run_requests[0].asset_selection == [AssetKey(k) for k in ("sdata", "patches", "latents")]
        assert third.run_requests[0].run_config == {"ops": {"patches": {"config": {"patch_size": [32, 32],
                                                                                  "scale": True}}}}

        # a cluster reference for this model: labels and statistics for every encoded well
        with storage.stage("cluster_reference") as out:
            out.mkdir()
            (out / "reference_info.json").write_text(json.dumps({"id": "r1", "model": "m/3"}))
        fourth = _evaluate(instance, home, cursor=second.cursor)
        plate1 = [r for r in fourth.run_requests if r.partition_key.startswith("PLATE1")]
        assert [r.asset_selection for r in plate1] == [[AssetKey("clusters"), AssetKey("graph_stats")]] * 2
        assert {r.run_key.split(":", 2)[2] for r in fourth.run_requests} == {"m/3+ref/r1"}


@pytest.mark.parametrize("key", ["P1/A01", "P1|A01", "P1,A01", "P1...A01", "P1..x_A01", "", "P1_", "_A01", "P 1_A01"])
def test_invalid_partition_keys(key):
    assert partition_key_problem(key) is not None
    with pytest.raises(ValueError):
        validate_partition_key(key)


def test_valid_partition_keys_split_at_the_last_underscore():
    assert partition_key_problem("SYNTH_2024.1-b_AB12") is None
    assert split_sample("PLATE_1_A01") == ("PLATE_1", "A01")
