"""Materialize one ``samples`` partition in this process (for the reliability tests and the soak).

``python _run_partition.py '<json>'`` with ``home`` (storage root), ``dagster_home`` (a persistent
instance shared by concurrent runs), ``key`` (or ``keys``: a plate run over that range, with the sensor's
tags), ``selection`` (asset names), ``executor`` (``multiprocess`` or ``in_process``) and optionally
``sdata_config`` (the ``sdata`` asset's run config) and ``hold``/``ready``: with the in-process
executor, ``hold="phenocoder_assets.resources:replace_dir"`` makes the step signal ``ready`` and block
just before its staged folder is renamed into place, so the parent can kill it at that instant. Exit code 0 when the run
succeeded, 1 when it failed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def multiprocess_job():
    from phenocoder_assets.definitions import build_definitions
    from phenocoder_assets.executors import select_executor

    return build_definitions(executor=select_executor("multiprocess")).resolve_job_def("sample_pipeline")


def in_process_job():
    from phenocoder_assets.definitions import build_definitions
    from phenocoder_assets.executors import select_executor

    return build_definitions(executor=select_executor("in_process")).resolve_job_def("sample_pipeline")


def main(args: dict) -> int:
    from dagster import AssetKey, DagsterInstance, execute_job, reconstructable

    if args.get("hold"):
        import importlib

        module, name = args["hold"].split(":")

        def held(*_a, **_k):
            Path(args["ready"]).write_text("ready")
            while True:
                time.sleep(1)

        setattr(importlib.import_module(module), name, held)
    job = {"multiprocess": multiprocess_job, "in_process": in_process_job}[args.get("executor", "multiprocess")]
    run_config = {"resources": {"storage": {"config": {"root": args["home"]}}},
                  "ops": {"patches": {"config": {"patch_size": [16, 16]}}}}
    if args.get("sdata_config"):
        run_config["ops"]["sdata"] = {"config": args["sdata_config"]}
    keys = args.get("keys") or [args["key"]]
    tags = {"dagster/partition": keys[0]}
    if len(keys) > 1:  # a plate run over the range, as the sensor requests it
        from phenocoder_assets.wells import DEFER_EVENTS_TAG, PLATE_RUN_TAG

        tags = {PLATE_RUN_TAG: keys[0].rsplit("_", 1)[0], DEFER_EVENTS_TAG: "true",
                "dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    with DagsterInstance.from_config(args["dagster_home"]) as instance:
        missing = [k for k in keys if not instance.has_dynamic_partition("samples", k)]
        if missing:
            instance.add_dynamic_partitions("samples", missing)
        with execute_job(reconstructable(job), instance=instance, run_config=run_config, tags=tags,
                         asset_selection=[AssetKey(a) for a in args["selection"]]) as result:
            return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
