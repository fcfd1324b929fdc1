"""``phenocoder`` console script.

``phenocoder demo [--home DIR] [--wells N] [--epochs N]`` writes a synthetic plate export into the
landing folder ``<home>/incoming/<plate>/``, registers its wells through the same sensor code that
watches the landing folder in production, materializes the whole asset graph in-process (ingest ->
patches -> model -> latents -> cluster reference -> clusters -> graph statistics -> embedding) into a
persistent Dagster instance (``$DAGSTER_HOME`` when set, else ``<home>/dagster/``; a ``dagster.yaml``
already there, e.g. one for PostgreSQL, is kept) with MLflow tracking under ``<home>/``, and prints how
to open the Dagster and MLflow UIs on 127.0.0.1 to inspect the result. Every stage runs with the
defaults of :mod:`phenocoder_assets.configs` (the values the sensor, the schedule and a launch from
the UI use) except what the command line sets and the demo's small network.

``phenocoder validate [--out DIR] [--wells-per-treatment N] [--epochs N] [--seed S] [--strict]`` scores the
pipeline against a fresh synthetic plate's planted truth (:mod:`phenocoder_lib.evaluation`) and prints
the table and the targets; with ``--strict`` the exit status is 1 when a target is missed. ``phenocoder
validate --json [--plates 3]`` scores well profiles on a multi-plate synthetic screen instead (retrieval mAP
per representation, :mod:`phenocoder_lib.screen_evaluation`) and prints one JSON document.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_PLATE = "DEMO"
#: Instance settings written into a new demo DAGSTER_HOME (runs queue for the `dagster dev` daemon).
DEMO_DAGSTER_YAML = """\
# Written by `phenocoder demo`. Used by `dagster dev` with DAGSTER_HOME set to this folder.
telemetry:
  enabled: false
concurrency:
  pools:
    granularity: op
  runs:
    max_concurrent_runs: 2
    tag_concurrency_limits:
      - key: "phenocoder/gpu"
        value: "true"
        limit: 1
"""


@dataclass
class DemoResult:
    """What ``run_demo`` produced (for the printout and for tests)."""

    home: Path
    dagster_home: Path
    plate_dir: Path
    samples: list[str]
    run_ids: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    mlflow: dict[str, Any] = field(default_factory=dict)


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def run_demo(home: str | Path | None = None, *, wells: int = 3, epochs: int = 5, patch_size: int = 32,
             image_size: int = 256, nuclei_per_well: int = 150, plate: str = DEMO_PLATE, seed: int = 0,
             quiet: bool = False) -> DemoResult:
    """Materialize the whole graph on a synthetic plate (see the module docstring); returns what it made."""
    from dagster import DagsterInstance, build_sensor_context, materialize
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from phenocoder_lib.io import write_text_atomic
    from phenocoder_lib.synthetic import make_synthetic_plate

    from .configs import DEMO_MODEL
    from .definitions import ASSETS
    from .resources import HOME_ENV, MLflowTracking, PhenocoderStorage, resolve_root
    from .sensors import incoming_plates_sensor
    from .wells import CHECK_WELLS, DEFER_EVENTS_TAG, PLATE_RUN_TAG

    t0 = time.perf_counter()
    _quiet_libraries()
    root = Path(resolve_root(str(home) if home is not None else None))
    if "://" in str(root):
        raise ValueError(f"the demo needs a local home folder, got {root!r}.")
    os.environ[HOME_ENV] = str(root)  # step code and anything launched later resolve the same root
    # Message passing, the spatial statistics and umap-learn/pynndescent compile numba kernels in every new
    # process (loaded from numba's cache after the first run, except pynndescent's): compile them in the
    # background while the plate is written and the model trains, not when their stage waits for them.
    threading.Thread(target=_warm_up_kernels, name="phenocoder-kernel-warm-up", daemon=True).start()
    # An instance the user chose (DAGSTER_HOME, e.g. one on PostgreSQL) wins over the demo's own.
    dagster_home = Path(os.environ["DAGSTER_HOME"]).expanduser().resolve() if os.environ.get("DAGSTER_HOME") \
        else root / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    if not (dagster_home / "dagster.yaml").exists():
        write_text_atomic(dagster_home / "dagster.yaml", DEMO_DAGSTER_YAML)
    # DAGSTER_HOME itself is left as it was: the runs get the instance explicitly, and a second demo in the
    # same process (tests, benchmarks) must not inherit the first one's instance.
    log_level = "WARNING" if quiet else "INFO"

    storage = PhenocoderStorage(root=str(root))
    resources = {"storage": storage, "mlflow": MLflowTracking(root=str(root))}
    plate_dir = storage.landing_dir / plate
    if (plate_dir / "EXPORT_COMPLETE").exists():
        _log(quiet, f"Using the synthetic plate already in {plate_dir}")
    else:
        _log(quiet, f"Writing a synthetic plate ({wells} wells) to {plate_dir} ...")
        make_synthetic_plate(plate_dir, n_wells=wells, ndim=3, image_size=image_size,
                             nuclei_per_well=nuclei_per_well, seed=seed)

    result = DemoResult(home=root, dagster_home=dagster_home, plate_dir=plate_dir, samples=[])
    with DagsterInstance.from_config(str(dagster_home)) as instance:
        # Register the wells exactly as the landing-folder sensor does in production.
        tick = incoming_plates_sensor(build_sensor_context(instance=instance, resources={"storage": storage}))
        for request in tick.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        prefix = f"{plate}_"
        result.samples = sorted(k for k in instance.get_dynamic_partitions("samples") if k.startswith(prefix))
        if not result.samples:
            raise RuntimeError(f"no wells of plate {plate!r} were registered; sensor said: {tick.skip_reason}")
        instance.event_log_storage.set_concurrency_slots("gpu", 1)

        def run(selection: list[str], partition: str | None = None, config: dict[str, Any] | None = None,
                wells: list[str] | None = None) -> None:
            """One in-process run: unpartitioned, one partition, or a plate run over ``wells`` (a range)."""
            what = ", ".join(selection) + (f" [{partition}]" if partition else "")
            tags = {"phenocoder/trigger": "demo"}
            if wells:
                what = ", ".join(selection) + f" [{wells[0]} ... {wells[-1]}: plate run]"
                tags.update({"phenocoder/plate": plate, PLATE_RUN_TAG: plate, DEFER_EVENTS_TAG: "true",
                             ASSET_PARTITION_RANGE_START_TAG: wells[0], ASSET_PARTITION_RANGE_END_TAG: wells[-1]})
            _log(quiet, f"  materializing {what}")
            run_config = {"ops": config or {}, "loggers": {"console": {"config": {"log_level": log_level}}}}
            res = materialize(ASSETS, selection=selection, partition_key=partition, instance=instance,
                              resources=resources, run_config=run_config, tags=tags)
            failed = {}  # a plate run carries on past a failed well and names it in the wells check
            for evaluation in res.get_asset_check_evaluations():
                if evaluation.check_name == CHECK_WELLS and not evaluation.passed:
                    entry = evaluation.metadata.get("failed_wells")
                    failed.update(dict(entry.value) if entry is not None else {str(evaluation.asset_key): "?"})
            if not res.success or failed:
                detail = f": {failed}" if failed else ""
                raise RuntimeError(f"the demo run for {what} failed{detail}; see the Dagster UI (run {res.run_id}).")
            result.run_ids.setdefault(selection[0], []).append(res.run_id)

        def per_well(selection: list[str], config: dict[str, Any] | None = None) -> None:
            """The wells' stage as the sensor runs it: one plate run when the wells are adjacent partitions."""
            if _adjacent(instance, result.samples):
                run(selection, config=config, wells=result.samples)
            else:
                for s in result.samples:
                    run(selection, s, config)

        # Only what the command line chose differs from the stage defaults (configs.py), so a rerun from
        # the UI with an empty config, the sensor's runs and the nightly schedule compute the same data.
        seeded = {"seed": seed} if seed != 0 else {}
        patches_cfg = {"patches": {"config": {"patch_size": [patch_size, patch_size], **seeded}}}
        per_well(["sdata", "patches"], patches_cfg)
        run(["model"], config={"model": {"config": {
            **DEMO_MODEL, "samples": result.samples, "n_epochs": epochs,
            "early_stopping_patience": max(epochs, 5), "seed": seed}}})
        per_well(["latents"])
        run(["cluster_reference"], config={"cluster_reference": {"config": seeded}} if seeded else None)
        per_well(["clusters", "graph_stats"], {"graph_stats": {"config": seeded}} if seeded else None)
        run(["embedding"], config={"embedding": {"config": seeded}} if seeded else None)
        # Profiles of every well; the demo plate has no layout.csv, so they are written and nothing is scored.
        run(["well_profiles"], config={"well_profiles": {"config": seeded}} if seeded else None)

    from .state import current_model_info

    result.mlflow = current_model_info(storage) or {}
    result.seconds = time.perf_counter() - t0
    return result


_COMPILE_KERNELS = "from phenocoder_lib.pipeline import warm_up_kernels; warm_up_kernels()"


def _warm_up_kernels() -> None:
    """:func:`phenocoder_lib.pipeline.warm_up_kernels`, never failing the demo (the stages compile anyway).

    On the first run after installation the kernels are compiled in a child process first: numba holds the
    GIL while it compiles (about 20 s of CPU), which in a thread would stall the demo's own Python work
    (Dagster's bookkeeping, the plate's writing). The child fills numba's on-disk cache; the call in this
    process then loads the kernels from it and compiles only what numba cannot cache (UMAP's layout).
    """
    import logging
    import subprocess
    import sys

    try:
        from phenocoder_lib.pipeline import kernels_cached, warm_up_kernels

        if not kernels_cached():
            subprocess.run([sys.executable, "-c", _COMPILE_KERNELS], capture_output=True, timeout=600, check=False)
        logging.getLogger(__name__).debug("numba kernels ready: %s", warm_up_kernels())
    except Exception:  # noqa: BLE001 -- a failed warm-up only means that each stage compiles its own kernels
        logging.getLogger(__name__).debug("kernel warm-up failed", exc_info=True)


def _adjacent(instance: Any, samples: list[str]) -> bool:
    """Whether ``samples``, in this order, are consecutive partitions (one range then holds exactly them)."""
    order = {k: i for i, k in enumerate(instance.get_dynamic_partitions("samples"))}
    positions = [order[s] for s in samples]
    return len(samples) > 1 and positions == list(range(positions[0], positions[0] + len(samples)))


def _quiet_libraries() -> None:
    """Keep the demo's output readable: no TensorFlow banners, zarr format notices or ome-zarr chatter."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    # zarr's autosharding notice is answered where the tables are written (phenocoder_lib.ingest.write_sdata)
    warnings.filterwarnings("ignore", message=".*without specifying model signature")
    for name in ("ome_zarr", "mlflow", "alembic", "absl", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _workspace_hint() -> str:
    workspace = Path(__file__).resolve().parents[1] / "workspace.yaml"
    return f"-w {workspace}" if workspace.exists() else "-m phenocoder_assets.definitions"


def print_instructions(result: DemoResult) -> None:
    """How to look at what the demo produced (both UIs bound to loopback)."""
    info = result.mlflow
    print()
    print(f"Phenocoder demo finished in {result.seconds:.0f} s: {len(result.samples)} wells "
          f"({', '.join(result.samples)}) under {result.home}")
    if info:
        print(f"  model: {info.get('registered_model_name')} version {info.get('version')} "
              f"(MLflow run {info.get('run_id')})")
    print(f"  files: {result.home}/<asset>/<sample>/   embedding: {result.home}/embedding/_/embedding.h5ad")
    print()
    print("Inspect it (both UIs listen on 127.0.0.1 only; see docs/platform.md before exposing them):")
    print("  Dagster UI (lineage, partitions, metadata, reruns):")
    print(f"    PHENOCODER_HOME={result.home} DAGSTER_HOME={result.dagster_home} \\")
    print(f"      dagster dev {_workspace_hint()} -h 127.0.0.1 -p 3000")
    print("    then open http://127.0.0.1:3000")
    print("  MLflow UI (training runs, metrics per epoch, registered model):")
    print(f"    mlflow ui --backend-store-uri sqlite:///{result.home}/mlflow.db --host 127.0.0.1 --port 5000")
    print("    then open http://127.0.0.1:5000")
    print(f"New plate exports dropped into {result.home}/incoming/<plate>/ (with an EXPORT_COMPLETE file) are "
          "picked up by the sensor while `dagster dev` runs.")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``phenocoder`` console script."""
    parser = argparse.ArgumentParser(prog="phenocoder", description="Phenocoder: microscopy plates -> spatially "
                                     "aware morphological embeddings (Dagster platform).")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Materialize the whole asset graph on a synthetic plate.",
                          description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--home", default=None,
                      help="Storage root (default: $PHENOCODER_HOME or ./.phenocoder). Dagster keeps its runs in "
                      "$DAGSTER_HOME if set, else <home>/dagster; MLflow in <home>/mlflow.db.")
    demo.add_argument("--wells", type=int, default=3, help="Wells of the synthetic plate (default 3).")
    demo.add_argument("--epochs", type=int, default=5, help="Training epochs (default 5).")
    demo.add_argument("--patch-size", type=int, default=32, help="Square patch size in pixels (default 32).")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the plate, the model and the clustering.")
    demo.add_argument("--quiet", action="store_true", help="Only print the summary.")
    validate = sub.add_parser("validate", help="Score the pipeline against a synthetic plate's planted truth.",
                              description="Generate a fresh seeded synthetic plate, run the pipeline (library "
                              "only, no Dagster) and print how well clusters recover the planted cell types and "
                              "the well embedding the treatments, and whether the targets are met. See "
                              "phenocoder_lib.evaluation and README 'Planted-truth validation'.")
    from phenocoder_lib.evaluation import build_parser  # light: numpy and pandas only

    build_parser(validate)
    args = parser.parse_args(argv)

    def require_positive(*names: str) -> None:
        for name in names:
            if getattr(args, name) is not None and getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")

    if args.command == "validate":
        require_positive("wells_per_treatment", "nuclei_per_well", "epochs", "plates", "null_size")
        if args.wells_per_treatment < 2:
            parser.error("--wells-per-treatment must be >= 2 (leave-one-out needs two wells per treatment).")
        from phenocoder_lib.evaluation import run_from_args

        _quiet_libraries()
        return run_from_args(args)
    if args.command == "demo":
        require_positive("wells", "epochs", "patch_size")
        if args.wells < 2:
            parser.error("--wells must be >= 2 (the well embedding compares wells).")
        result = run_demo(args.home, wells=args.wells, epochs=args.epochs, patch_size=args.patch_size,
                          seed=args.seed, quiet=args.quiet)
        print_instructions(result)
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
