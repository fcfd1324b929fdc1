"""Transient failures retry (step retries with backoff, run retries), and pools cap the heavy stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from dagster import AssetKey, Backoff, Jitter, build_sensor_context, instance_for_test, materialize

from phenocoder_assets.definitions import ASSETS, POOL_LIMITS, apply_pool_limits
from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage
from phenocoder_assets.sensors import RUN_RETRIES, incoming_plates_sensor

REPO = Path(__file__).resolve().parents[2]
PER_SAMPLE = {"sdata", "patches", "latents", "clusters", "graph_stats"}


def _resources(home):
    return {"storage": PhenocoderStorage(root=str(home)), "mlflow": MLflowTracking(root=str(home))}


def test_per_sample_steps_retry_with_exponential_backoff_and_heavy_stages_have_pools():
    by_name = {a.key.to_user_string(): a for a in ASSETS}
    for name in PER_SAMPLE:
        policy = by_name[name].op.retry_policy
        assert policy is not None and policy.max_retries == 2, name
        assert policy.backoff == Backoff.EXPONENTIAL and policy.jitter == Jitter.PLUS_MINUS, name
    assert {n: by_name[n].op.pool for n in ("sdata", "patches", "model", "latents")} == {
        "sdata": "ingest", "patches": "ingest", "model": "gpu", "latents": "gpu"}
    assert set(POOL_LIMITS) == {"gpu", "ingest"} and POOL_LIMITS["gpu"] == 1


_FLAKY_RUN = """
import json, sys
import phenocoder_lib.ingest as ingest
from dagster import DagsterEventType, DagsterInstance, materialize
from phenocoder_assets.definitions import ASSETS
from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage

home = sys.argv[1]
real = ingest.read_plate
calls = []
def flaky(plate_dir, wells, **kw):
    calls.append(wells[0])
    if len(calls) == 1:
        raise OSError("stale file handle (transient)")
    return real(plate_dir, wells=wells, **kw)
ingest.read_plate = flaky
instance = DagsterInstance.ephemeral()
instance.add_dynamic_partitions("samples", ["TINY_A01"])
res = materialize(ASSETS, selection=["sdata"], partition_key="TINY_A01", instance=instance, raise_on_error=False,
                  resources={"storage": PhenocoderStorage(root=home), "mlflow": MLflowTracking(root=home)})
types = [e.event_type_value for e in res.all_events]
print(json.dumps({"success": res.success, "calls": calls, "retries": types.count("STEP_UP_FOR_RETRY"),
                  "materialized": sorted(instance.get_materialized_partitions(
                      __import__("dagster").AssetKey("sdata")))}))
"""


def test_transient_step_failure_is_retried(tmp_path, copy_plate):
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    # the delay is read when the definitions load: a fresh process with a short one
    env = {**os.environ, "PHENOCODER_STEP_RETRY_DELAY": "0.2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _FLAKY_RUN, str(home)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"success": True, "calls": ["A01", "A01"], "retries": 1, "materialized": ["TINY_A01"]}


def test_sensor_runs_ask_for_run_retries_and_a_failed_run_is_picked_for_retry(tmp_path, copy_plate):
    from dagster._daemon.auto_run_reexecution.auto_run_reexecution import filter_runs_to_should_retry

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    with instance_for_test(overrides={"run_retries": {"enabled": True}}) as instance:
        result = incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))
        (req,) = result.run_requests
        assert req.tags["dagster/max_retries"] == str(RUN_RETRIES)
        assert req.tags["dagster/retry_strategy"] == "FROM_FAILURE"
        instance.add_dynamic_partitions("samples", ["TINY_A01"])
        # a run with the sensor's tags that fails (its plate folder is gone)
        (home / "incoming" / "TINY" / "EXPORT_COMPLETE").unlink()
        import shutil

        shutil.rmtree(home / "incoming" / "TINY")
        res = materialize(ASSETS, selection=["sdata"], partition_key="TINY_A01", instance=instance,
                          resources=_resources(home), raise_on_error=False,
                          tags={k: v for k, v in req.tags.items() if k.startswith("dagster/") and "range" not in k
                                and k != "dagster/defer_asset_events"})
        assert not res.success
        run = instance.get_run_by_id(res.run_id)
        assert [r.run_id for r in filter_runs_to_should_retry([run], instance)] == [res.run_id]


def test_pool_limit_holds_a_step_until_a_slot_frees(tmp_path, copy_plate):
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    with instance_for_test() as instance:
        assert apply_pool_limits(instance) == POOL_LIMITS
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
        with pytest.raises(ValueError, match="limit of pool 'ingest' is 0"):
            apply_pool_limits(instance, {"ingest": 0})
        apply_pool_limits(instance, {"ingest": 1})
        instance.add_dynamic_partitions("samples", ["TINY_A01"])
        # another run's ingest step holds the only slot
        claim = instance.event_log_storage.claim_concurrency_slot("ingest", "other-run", "sdata")
        assert claim.is_claimed
        box = {}

        def _run():
            box["result"] = materialize(ASSETS, selection=["sdata"], partition_key="TINY_A01", instance=instance,
                                        resources=_resources(home))

        worker = threading.Thread(target=_run)
        worker.start()
        deadline = time.time() + 120
        storage = instance.event_log_storage
        while time.time() < deadline and storage.get_concurrency_info("ingest").pending_step_count < 1:
            time.sleep(0.5)
        info = instance.event_log_storage.get_concurrency_info("ingest")
        assert info.pending_step_count == 1 and info.active_slot_count == 1  # our step waits for the slot
        time.sleep(2)
        assert worker.is_alive() and not instance.get_materialized_partitions(AssetKey("sdata"))
        instance.event_log_storage.free_concurrency_slots_for_run("other-run")
        worker.join(timeout=120)
        assert not worker.is_alive() and box["result"].success
        assert instance.get_materialized_partitions(AssetKey("sdata")) == {"TINY_A01"}


def test_bad_well_attempts_setting_is_named(monkeypatch):
    from phenocoder_assets.wells import _attempts

    monkeypatch.setenv("PHENOCODER_WELL_ATTEMPTS", "zero")
    with pytest.raises(ValueError, match="PHENOCODER_WELL_ATTEMPTS"):
        _attempts()
    monkeypatch.setenv("PHENOCODER_WELL_ATTEMPTS", "0")
    with pytest.raises(ValueError, match="must be >= 1"):
        _attempts()



def test_an_input_error_fails_at_once_without_retries(tmp_path, copy_plate, monkeypatch):
    """A wrong setting or a missing file fails the same way again: no step retry, the message on top."""
    from dagster import DagsterInstance

    import phenocoder_lib.ingest as ingest

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    calls = []

    def broken(plate_dir, wells, **kw):
        calls.append(wells[0])
        raise ValueError("pixel_size_um=-1 must be > 0; set it in plate.json")

    monkeypatch.setattr(ingest, "read_plate", broken)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("samples", ["TINY_A01"])
    res = materialize(ASSETS, selection=["sdata"], partition_key="TINY_A01", instance=instance,
                      resources=_resources(home), raise_on_error=False)
    assert not res.success
    assert calls == ["TINY_A01"[-3:]]  # one attempt only
    assert [e.event_type_value for e in res.all_events].count("STEP_UP_FOR_RETRY") == 0
    (failure,) = res.get_step_failure_events()
    error = failure.event_specific_data.error
    assert "TINY_A01: ValueError: pixel_size_um=-1 must be > 0" in error.message
    assert error.cause.cls_name == "ValueError"
