"""Plate runs: the sensor's one run per plate records one materialization per well, and one well's
failure is named without stopping its plate; a one-well rerun (as from the UI) still works."""

from __future__ import annotations

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance, build_sensor_context, materialize

from phenocoder_assets.definitions import ASSETS
from phenocoder_assets.resources import MLflowTracking, PhenocoderStorage
from phenocoder_assets.sensors import RUN_RETRY_TAGS, incoming_plates_sensor, plate_run_requests, well_digests
from phenocoder_assets.wells import CHECK_WELLS, DEFER_EVENTS_TAG, PLATE_RUN_TAG, WELL_ATTEMPTS_ENV

WELLS = ["TINY_A01", "TINY_A02"]
#: The tags of the sensor's plate run over WELLS.
PLATE_TAGS = {PLATE_RUN_TAG: "TINY", DEFER_EVENTS_TAG: "true", "dagster/asset_partition_range_start": WELLS[0],
              "dagster/asset_partition_range_end": WELLS[1]}


def _resources(home):
    return {"storage": PhenocoderStorage(root=str(home)), "mlflow": MLflowTracking(root=str(home))}


def _check(instance, asset):
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(AssetKey(asset), CHECK_WELLS)])[AssetCheckKey(AssetKey(asset), CHECK_WELLS)]
    return record.event.dagster_event.event_specific_data


def test_sensor_requests_one_run_per_plate(tmp_path, copy_plate, monkeypatch):
    monkeypatch.delenv("PHENOCODER_SENSOR_RUNS", raising=False)
    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    instance = DagsterInstance.ephemeral()
    result = incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [WELLS]
    (req,) = result.run_requests
    assert req.partition_key is None
    assert (req.partition_key_range.start, req.partition_key_range.end) == tuple(WELLS)
    assert req.tags[PLATE_RUN_TAG] == "TINY" and req.tags[DEFER_EVENTS_TAG] == "true"
    assert req.tags["dagster/max_retries"] == RUN_RETRY_TAGS["dagster/max_retries"]
    assert req.asset_selection == [AssetKey("sdata"), AssetKey("patches")]

    monkeypatch.setenv("PHENOCODER_SENSOR_RUNS", "well")
    per_well = incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))
    assert [r.partition_key for r in per_well.run_requests] == WELLS
    monkeypatch.setenv("PHENOCODER_SENSOR_RUNS", "plates")
    with pytest.raises(ValueError, match="PHENOCODER_SENSOR_RUNS='plates'"):
        incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))


def test_grouping_splits_on_stages_and_gaps():
    order = {k: i for i, k in enumerate(["P_A01", "P_A02", "Q_A01", "P_A03", "P_A04", "P_A05"])}
    wells = [("P_A01", "A01", "d1", ("sdata", "patches")), ("P_A02", "A02", "d2", ("sdata", "patches")),
             ("P_A03", "A03", "d3", ("sdata", "patches")), ("P_A04", "A04", "d4", ("latents",)),
             ("P_A05", "A05", "d5", ("latents",)), ("P_A06", "A06", "d6", ())]
    order["P_A06"] = 6
    reqs = plate_run_requests("P", wells, order, "none", None)
    spans = [(r.partition_key,) if r.partition_key else (r.partition_key_range.start, r.partition_key_range.end)
             for r in reqs]
    # A01-A02 adjacent; A03 is separated by another plate's well; A04-A05 need other stages; A06 nothing
    assert spans == [("P_A01", "P_A02"), ("P_A03",), ("P_A04", "P_A05")]
    assert [r.asset_selection for r in reqs][2] == [AssetKey("latents")]
    assert len({r.run_key for r in reqs}) == 3


def test_plate_run_records_each_well_and_names_the_failing_one(tmp_path, copy_plate, monkeypatch):
    import phenocoder_lib.ingest as ingest

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    monkeypatch.setenv(WELL_ATTEMPTS_ENV, "2")
    monkeypatch.setenv("PHENOCODER_WELL_RETRY_DELAY", "0")
    real_read = ingest.read_plate
    calls = []

    def flaky_read(plate_dir, wells, **kw):  # A01 fails once (transient), A02 always (a broken well)
        calls.append(wells[0])
        if wells == ["A02"] or calls.count("A01") == 1 and wells == ["A01"]:
            raise OSError(f"cannot read well {wells[0]}")
        return real_read(plate_dir, wells=wells, **kw)

    monkeypatch.setattr(ingest, "read_plate", flaky_read)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("samples", WELLS)
    res = materialize(ASSETS, selection=["sdata", "patches"], instance=instance, resources=_resources(home),
                      tags=PLATE_TAGS)
    assert res.success  # the plate run finishes: the broken well does not stop it
    assert calls == ["A01", "A01", "A02", "A02"]  # A01 retried once and passed; A02 tried twice
    for asset in ("sdata", "patches"):
        assert instance.get_materialized_partitions(AssetKey(asset)) == {"TINY_A01"}
        evaluation = _check(instance, asset)
        assert evaluation.passed is False
        failed = evaluation.metadata["failed_wells"].value
        assert list(failed) == ["TINY_A02"]
    assert "cannot read well A02" in _check(instance, "sdata").metadata["failed_wells"].value["TINY_A02"]
    assert "skipped" in _check(instance, "patches").metadata["failed_wells"].value["TINY_A02"]
    # per-well metadata, not one block for the range
    (record,) = instance.fetch_materializations(AssetKey("sdata"), limit=5).records
    assert record.asset_materialization.partition == "TINY_A01"
    assert record.asset_materialization.metadata["n_objects"].value > 0
    assert (home / "sdata" / "TINY_A01" / "sdata.zarr").is_dir()
    assert not (home / "sdata" / "TINY_A02").exists()

    # the broken well is fixed and rerun alone, as from the UI (no plate-run tags): a plain run
    monkeypatch.setattr(ingest, "read_plate", real_read)
    rerun = materialize(ASSETS, selection=["sdata", "patches"], instance=instance, resources=_resources(home),
                        partition_key="TINY_A02")
    assert rerun.success
    assert instance.get_materialized_partitions(AssetKey("patches")) == set(WELLS)
    assert _check(instance, "patches").passed is True


def test_later_stage_learns_of_failed_wells_from_the_run_events(tmp_path, copy_plate, monkeypatch):
    """With one process per step (the default executor) the later stage reads the failed wells from
    the run's check events; simulated here by turning off the in-process memory of failures."""
    import phenocoder_assets.wells as wells
    import phenocoder_lib.ingest as ingest

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    monkeypatch.setenv(WELL_ATTEMPTS_ENV, "1")
    real_read = ingest.read_plate

    def broken_a02(plate_dir, wells, **kw):
        if wells == ["A02"]:
            raise ValueError("well A02: label image is truncated")
        return real_read(plate_dir, wells=wells, **kw)

    monkeypatch.setattr(ingest, "read_plate", broken_a02)
    monkeypatch.setattr(wells, "_remember_failures", lambda *a, **k: None)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("samples", WELLS)
    # an older sdata of A02 on disk must not be used by patches when A02's new sdata failed
    res = materialize(ASSETS, selection=["sdata", "patches"], instance=instance, resources=_resources(home),
                      tags=PLATE_TAGS)
    assert res.success
    assert instance.get_materialized_partitions(AssetKey("patches")) == {"TINY_A01"}
    failed = _check(instance, "patches").metadata["failed_wells"].value
    assert list(failed) == ["TINY_A02"] and "sdata failed" in failed["TINY_A02"]


def test_archived_plate_leaves_the_live_partitions_and_is_not_registered_again(tmp_path, copy_plate):
    from phenocoder_assets.archive import archive_plates, archived_plates, restore_plates

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    copy_plate(home / "incoming" / "OTHER")
    storage = PhenocoderStorage(root=str(home))
    instance = DagsterInstance.ephemeral()
    first = incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))
    instance.add_dynamic_partitions("samples", list(first.dynamic_partitions_requests[0].partition_keys))
    assert len(instance.get_dynamic_partitions("samples")) == 4
    assert archive_plates(instance, storage, ["TINY"]) == WELLS
    assert instance.get_dynamic_partitions("samples") == ["OTHER_A01", "OTHER_A02"]
    assert archived_plates(storage) == {"TINY"}
    # without a cursor the sensor sees both folders again: the archived plate is left alone
    again = incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))
    assert not again.dynamic_partitions_requests
    assert all("TINY" not in (r.run_key or "") for r in again.run_requests)
    with pytest.raises(ValueError, match=r"plates \['NOPE'\] have no 'samples' partitions"):
        archive_plates(instance, storage, ["NOPE"])
    restore_plates(storage, ["TINY"])
    back = incoming_plates_sensor(build_sensor_context(instance=instance, resources=_resources(home)))
    assert [list(r.partition_keys) for r in back.dynamic_partitions_requests] == [WELLS]


def test_plate_run_ingests_in_worker_processes_as_in_the_step(tmp_path, copy_plate, folder_digest, monkeypatch):
    """``workers``: the wells are ingested in worker processes, and recorded as when the step ingests them."""
    monkeypatch.setenv("PHENOCODER_WELL_RETRY_DELAY", "0")
    plates = {"good": copy_plate(tmp_path / "good" / "TINY"), "broken": copy_plate(tmp_path / "broken" / "TINY")}
    sorted((plates["broken"] / "imgs").glob("*_A02_*"))[0].write_bytes(b"not an image")
    instances = {}
    for name, plate, workers in (("step", "good", 1), ("workers", "good", 2), ("broken", "broken", 2)):
        home = tmp_path / name
        instances[name] = instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("samples", WELLS)
        config = {"workers": workers, "plate_dir": str(plates[plate])}
        assert materialize(ASSETS, selection=["sdata"], instance=instance, resources=_resources(home), tags=PLATE_TAGS,
                           run_config={"ops": {"sdata": {"config": config}}}).success
        assert not [p.name for p in (home / "sdata").iterdir() if p.name.startswith(".")]  # no scratch left
    step, workers = tmp_path / "step" / "sdata", tmp_path / "workers" / "sdata"
    for well in WELLS:
        assert folder_digest(workers / well / "sdata.zarr") == folder_digest(step / well / "sdata.zarr")
        for name in ("data_version.json", "summary.json"):  # workers is not a setting of the data
            assert (workers / well / name).read_text() == (step / well / name).read_text()
        assert (workers / well / "preview.png").stat().st_size > 1000
    records = instances["workers"].fetch_materializations(AssetKey("sdata"), limit=5).records
    assert sorted(r.asset_materialization.partition for r in records) == WELLS
    assert all(r.asset_materialization.metadata["n_objects"].value > 0 for r in records)
    # a broken well in a worker: named by the check, the other well recorded, nothing half-written
    broken = instances["broken"]
    assert broken.get_materialized_partitions(AssetKey("sdata")) == {"TINY_A01"}
    failed = _check(broken, "sdata").metadata["failed_wells"].value
    assert list(failed) == ["TINY_A02"] and "cannot read image file" in failed["TINY_A02"]
    assert not (tmp_path / "broken" / "sdata" / "TINY_A02").exists()


def test_plate_run_without_worker_processes_ingests_in_the_step(tmp_path, copy_plate, monkeypatch, plate_scans):
    """Where processes cannot be started (a sandbox without semaphores), the step ingests the wells itself,
    with one scan of the plate for the whole run (each well's digest still the sensor's)."""
    import json

    import phenocoder_lib.parallel as parallel
    from phenocoder_lib.ingest import scan_plate

    def no_processes(*a, **k):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(parallel, "PrefetchPool", no_processes)
    home = tmp_path / "home"
    plate_dir = copy_plate(home / "incoming" / "TINY")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("samples", WELLS)
    res = materialize(ASSETS, selection=["sdata"], instance=instance, resources=_resources(home), tags=PLATE_TAGS,
                      run_config={"ops": {"sdata": {"config": {"workers": 2}}}})
    assert res.success
    assert len(plate_scans) == 1  # not one (or two) per well
    assert instance.get_materialized_partitions(AssetKey("sdata")) == set(WELLS)
    logs = [e.message for e in instance.all_logs(res.run_id)]
    assert any("no ingest worker processes (OSError" in m for m in logs)
    assert not [p.name for p in (home / "sdata").iterdir() if p.name.startswith(".")]
    sensor_digests = well_digests(plate_dir, scan_plate(plate_dir, plate="TINY"), [])
    for sample in WELLS:
        summary = json.loads((home / "sdata" / sample / "summary.json").read_text())
        assert summary["source_digest"] == sensor_digests[sample.split("_")[1]]


def test_plate_run_records_lineage_per_well(tmp_path, copy_plate):
    """Each well of a plate run carries its inputs' versions: FRESH after the run, and a changed upstream
    well makes exactly its own downstream partition STALE (an identical rerun leaves it FRESH)."""
    from phenocoder_assets.definitions import defs
    from phenocoder_assets.refresh import stale_resolver

    home = tmp_path / "home"
    copy_plate(home / "incoming" / "TINY")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("samples", WELLS)
    assert materialize(ASSETS, selection=["sdata", "patches"], instance=instance, resources=_resources(home),
                       tags=PLATE_TAGS).success
    (record,) = instance.fetch_materializations(AssetKey("patches"), limit=1).records
    tags_written = record.asset_materialization.tags
    assert tags_written["dagster/input_data_version/sdata"] != "INITIAL"
    assert int(tags_written["dagster/input_event_pointer/sdata"]) > 0

    def status(asset):
        resolver = stale_resolver(instance, defs.resolve_asset_graph())
        return [resolver.get_status(AssetKey(asset), w).value for w in WELLS]

    assert status("sdata") == status("patches") == ["FRESH", "FRESH"]
    # the same well read again with the same settings: the same data version, nothing out of date
    assert materialize(ASSETS, selection=["sdata"], instance=instance, resources=_resources(home),
                       partition_key=WELLS[0]).success
    assert status("patches") == ["FRESH", "FRESH"]
    # read with another pixel size: other data, so that well's patches are out of date, the other's not
    assert materialize(ASSETS, selection=["sdata"], instance=instance, resources=_resources(home),
                       partition_key=WELLS[0],
                       run_config={"ops": {"sdata": {"config": {"pixel_size_um": 0.5}}}}).success
    assert status("patches") == ["STALE", "FRESH"]


def test_a_run_plans_its_wells_with_one_scan_per_plate_in_the_runs_order(tmp_path, copy_plate):
    """``_plan``: the wells of a run across plates, in the run's order (the order the step takes them from
    the workers), each with its own files; an unreadable plate's wells are left to fail on their own."""
    from dagster import build_asset_context

    from phenocoder_assets.assets.ingest import _plan
    from phenocoder_assets.configs import IngestConfig

    home = tmp_path / "home"
    for plate in ("P", "Q"):
        copy_plate(home / "incoming" / plate)
    (home / "incoming" / "BROKEN").mkdir()  # no imgs/ labels/ tables/
    keys = ["P_A01", "Q_A01", "BROKEN_A01", "P_A02", "Q_A03", "BROKEN_A02"]
    planned = _plan(build_asset_context(), IngestConfig(), PhenocoderStorage(root=str(home)), keys)
    assert list(planned) == ["P_A01", "Q_A01", "P_A02"]  # Q_A03 is not a well of Q; BROKEN cannot be scanned
    for sample, plan in planned.items():
        plate, well = sample.split("_")
        assert plan.plate_dir == home / "incoming" / plate and plan.files.wells == [well]
        assert plan.files.plate == plate and {k[0] for k in plan.files.images} == {well}
