"""Per-well asset bodies that also run a whole plate in one run (one materialization per well).

Every per-sample asset body is written for one well (``body(sample) -> MaterializeResult``).
:func:`for_each_well` runs it for the partition(s) of the current run:

* one partition (a rerun of one well from the UI, a test): the body's result is the asset's
  result, unchanged;
* a partition range launched by the sensor for a plate (run tag :data:`PLATE_RUN_TAG`, together
  with Dagster's ``dagster/defer_asset_events`` tag so that Dagster does not record the range as
  one block): each well is processed in turn inside the same process -- the imports, TensorFlow
  and the model are loaded once per plate instead of once per well -- and one
  ``AssetMaterialization`` per well is logged with that well's metadata and data version. A well
  that fails (after :data:`WELL_ATTEMPTS_ENV` attempts) is logged by name, gets no materialization,
  is skipped by the later stages of the run, and is named by the asset check
  :data:`CHECK_WELLS` -- the other wells of its plate carry on;
* a partition range without those tags (a single-run backfill from the UI): every well is
  processed, and any failure fails the step (Dagster records a range as a whole).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetMaterialization,
    BackfillPolicy,
    Backoff,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
)

#: Run tag of the sensor's plate runs (value: the plate id).
PLATE_RUN_TAG = "phenocoder/plate_run"
#: Dagster's tag that turns off the automatic materialization events of an output (the body logs
#: one event per well instead).
DEFER_EVENTS_TAG = "dagster/defer_asset_events"
#: Attempts per well inside a plate run (transient errors of one well, e.g. a busy file system).
WELL_ATTEMPTS_ENV = "PHENOCODER_WELL_ATTEMPTS"
#: Seconds before the second attempt of a well (doubled for each further attempt).
WELL_RETRY_DELAY_ENV = "PHENOCODER_WELL_RETRY_DELAY"
#: Asset check naming the wells that failed in a plate run.
CHECK_WELLS = "every_well_processed"

#: Seconds before the first step retry (``$PHENOCODER_STEP_RETRY_DELAY``, read when the definitions load).
STEP_RETRY_DELAY_ENV = "PHENOCODER_STEP_RETRY_DELAY"
#: Step retries of the per-sample assets: a transient error (network file system, object store, a
#: busy GPU) is retried twice, after ~10 s then ~20 s (exponential backoff, +- the delay of jitter so
#: that the wells of a plate do not retry in lock-step). A deterministic error fails again, and the
#: run fails (the sensor's runs then get a run retry from the failed step, see ``sensors.RUN_RETRY_TAGS``).
STEP_RETRY_POLICY = RetryPolicy(max_retries=2, delay=float(os.environ.get(STEP_RETRY_DELAY_ENV) or 10),
                                backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)

#: Backfills launched from the UI over many wells: up to one plate (384 wells) per run instead of one
#: run per well. Such a run is all-or-nothing (Dagster records a range as a whole); the sensor's
#: plate runs are not (see the module docstring).
WELLS_PER_BACKFILL_RUN = 384
BACKFILL_POLICY = BackfillPolicy.multi_run(max_partitions_per_run=WELLS_PER_BACKFILL_RUN)



def wells_check_spec(asset: str) -> AssetCheckSpec:
    """The :data:`CHECK_WELLS` check of a per-sample asset (blocking nothing: the plate carries on)."""
    return AssetCheckSpec(CHECK_WELLS, asset=asset, blocking=False,
                          description="Every well of the run was processed; names the wells that failed "
                          "(after retries) so that they can be rerun one by one.")


def per_sample_asset(*, check_specs: tuple[AssetCheckSpec, ...] = (), **kwargs: Any) -> Callable:
    """``@asset`` decorator of a per-well stage, with what every such stage shares.

    That is the ``samples`` partitions, the ``per_sample`` group, step retries, plate-sized backfill
    runs and the :data:`CHECK_WELLS` check, plus the stage's own ``kwargs`` (and ``check_specs``).
    """
    from dagster import asset

    from .partitions import samples_partitions

    def decorate(fn: Callable) -> Any:
        return asset(partitions_def=samples_partitions, group_name="per_sample", retry_policy=STEP_RETRY_POLICY,
                     backfill_policy=BACKFILL_POLICY, check_specs=[wells_check_spec(fn.__name__), *check_specs],
                     **kwargs)(fn)

    return decorate


def is_plate_run(context: Any) -> bool:
    """Whether the run is a sensor plate run that logs one materialization per well."""
    tags = context.run.tags
    return bool(tags.get(PLATE_RUN_TAG)) and str(tags.get(DEFER_EVENTS_TAG, "")).lower() == "true"


def _attempts() -> tuple[int, float]:
    try:
        attempts = int(os.environ.get(WELL_ATTEMPTS_ENV, "2"))
        delay = float(os.environ.get(WELL_RETRY_DELAY_ENV, "5"))
    except ValueError as err:
        raise ValueError(f"{WELL_ATTEMPTS_ENV} / {WELL_RETRY_DELAY_ENV} must be numbers ({err}); "
                         "unset them for the defaults (2 attempts, 5 s).") from err
    if attempts < 1 or delay < 0:
        raise ValueError(f"{WELL_ATTEMPTS_ENV}={attempts} must be >= 1 and {WELL_RETRY_DELAY_ENV}={delay} >= 0.")
    return attempts, delay


#: Errors of the input or of the settings: the same call fails the same way again, so neither a well's
#: attempts nor the step's :data:`STEP_RETRY_POLICY` repeat them, and the user reads the message at once.
INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError, FileNotFoundError, NotADirectoryError)


def _without_retries_for_input_errors(body: Callable[[str], MaterializeResult]) -> Callable[[str], MaterializeResult]:
    """``body`` whose input errors fail the step at once (``Failure(allow_retries=False)``, the error as cause)."""
    from dagster import Failure

    def run(sample: str) -> MaterializeResult:
        try:
            return body(sample)
        except INPUT_ERRORS as err:
            raise Failure(description=f"{sample}: {type(err).__name__}: {err}", allow_retries=False) from err

    return run


def _with_retries(context: Any, sample: str, body: Callable[[str], MaterializeResult]) -> MaterializeResult:
    attempts, delay = _attempts()
    for attempt in range(1, attempts + 1):
        try:
            return body(sample)
        except Exception as err:  # noqa: BLE001 - any error of one well must not stop its plate
            if attempt == attempts or isinstance(err, INPUT_ERRORS):
                raise
            context.log.warning(f"{sample}: attempt {attempt}/{attempts} failed ({type(err).__name__}: {err}); "
                                f"retrying in {delay:.0f} s")
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def for_each_well(context: Any, body: Callable[[str], MaterializeResult], *,
                  upstream: tuple[str, ...] = ()) -> Iterator[Any]:
    """Run ``body`` for each partition of the run; see the module docstring.

    ``upstream`` names the per-sample assets the body reads: in a plate run, a well whose upstream
    step failed earlier in the same run is skipped (and reported) instead of failing again.
    """
    keys = list(context.partition_keys)
    asset_key = context.asset_key
    body = _without_retries_for_input_errors(body) if not is_plate_run(context) else body
    if len(keys) == 1 and not is_plate_run(context):
        result = body(keys[0])
        yield _with_wells_check(result, keys, [])
        return
    if not is_plate_run(context):  # a range run from the UI: Dagster records the range as a whole
        results = []
        for key in keys:
            result = body(key)
            context.add_asset_metadata(dict(result.metadata or {}), partition_key=key)
            results.append(result)
        yield MaterializeResult(check_results=_merge_checks(results, keys, []))
        return
    failed = _failed_upstream(context, upstream)
    results, done, errors = [], [], {}
    for key in keys:
        if key in failed:
            errors[key] = f"skipped: {failed[key]}"
            context.log.error(f"{key}: {asset_key.to_user_string()} skipped ({failed[key]})")
            continue
        try:
            result = _with_retries(context, key, body)
        except Exception as err:  # noqa: BLE001 - reported by name below, the plate carries on
            errors[key] = f"{type(err).__name__}: {err}"
            context.log.error(f"well {key} failed in {asset_key.to_user_string()}: {errors[key]} "
                              f"(rerun it alone: materialize partition {key!r})")
            continue
        tags = _version_tags(context, key, result)
        yield AssetMaterialization(asset_key=asset_key, partition=key, metadata=dict(result.metadata or {}),
                                   tags=tags or None)
        results.append(result)
        done.append(key)
    _remember_failures(context, asset_key.to_user_string(), errors)
    yield MaterializeResult(check_results=_merge_checks(results, done, sorted(errors.items())))


def _version_tags(context: Any, key: str, result: MaterializeResult) -> dict[str, str] | None:
    """The data-version tags Dagster writes for a materialization it records itself, for one well.

    Its staleness reads them: the well's data and code version, and for each upstream asset the data
    version and event (storage id) it was computed from -- the same well's partition of a per-sample
    asset, the latest materialization of an unpartitioned one. Without the upstream tags Dagster would
    report every well of a plate run as STALE ("has a new dependency").
    """
    from dagster._core.definitions.data_version import (
        CODE_VERSION_TAG,
        DATA_VERSION_IS_USER_PROVIDED_TAG,
        DATA_VERSION_TAG,
        DEFAULT_DATA_VERSION,
        NULL_EVENT_POINTER,
        extract_data_version_from_entry,
        get_input_data_version_tag,
        get_input_event_pointer_tag,
    )

    if result.data_version is None:
        return None
    tags = {DATA_VERSION_TAG: result.data_version.value, DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
    code_version = _code_version(context)
    if code_version:
        tags[CODE_VERSION_TAG] = code_version
    layer = context.job_def.asset_layer
    for dep in sorted(layer.get(context.asset_key).parent_keys):
        partition = key if layer.get(dep).partitions_def is not None else None
        record = context.instance.get_latest_data_version_record(dep, False, partition)
        version = (extract_data_version_from_entry(record.event_log_entry) if record else None) or DEFAULT_DATA_VERSION
        tags[get_input_data_version_tag(dep)] = version.value
        tags[get_input_event_pointer_tag(dep)] = str(record.storage_id) if record else NULL_EVENT_POINTER
    return tags


def _code_version(context: Any) -> str | None:
    try:
        return context.assets_def.code_versions_by_key.get(context.asset_key)
    except Exception:  # noqa: BLE001 - only a tag
        return None


def _with_wells_check(result: MaterializeResult, keys: list[str], errors: list) -> MaterializeResult:
    checks = list(result.check_results or [])
    checks.append(_wells_check(keys, errors))
    return MaterializeResult(metadata=result.metadata, check_results=checks, data_version=result.data_version,
                             tags=result.tags)


def _wells_check(done: list[str], errors: list[tuple[str, str]]) -> AssetCheckResult:
    return AssetCheckResult(
        check_name=CHECK_WELLS, passed=not errors, severity=AssetCheckSeverity.WARN,
        metadata={"n_wells": len(done) + len(errors), "n_failed": len(errors),
                  "failed_wells": MetadataValue.json({k: v[:300] for k, v in errors}),
                  "wells": MetadataValue.text(", ".join(done[:20]) + (" ..." if len(done) > 20 else ""))})


def _merge_checks(results: list[MaterializeResult], done: list[str], errors: list) -> list[AssetCheckResult]:
    """One result per check over the wells of the run: passed when every well passed, naming the others."""
    by_name: dict[str, list[tuple[str, AssetCheckResult]]] = {}
    for key, result in zip(done, results, strict=True):
        for check in result.check_results or []:
            by_name.setdefault(check.check_name, []).append((key, check))
    merged = []
    for name, items in by_name.items():
        bad = [k for k, c in items if not c.passed]
        severity = (AssetCheckSeverity.ERROR if any(c.severity == AssetCheckSeverity.ERROR for _, c in items)
                    else AssetCheckSeverity.WARN)
        merged.append(AssetCheckResult(check_name=name, passed=not bad, severity=severity,
                                       metadata={"n_wells": len(items), "failing_wells": MetadataValue.json(bad)}))
    merged.append(_wells_check(done, errors))
    return merged


# Wells that failed in this run, per asset: later stages of the same run skip them.
_FAILED: dict[tuple[str, str], dict[str, str]] = {}


def _remember_failures(context: Any, asset: str, errors: dict[str, str]) -> None:
    _FAILED[(context.run.run_id, asset)] = dict(errors)


def _failed_upstream(context: Any, upstream: tuple[str, ...]) -> dict[str, str]:
    """Wells whose upstream asset failed earlier in this run (from the run's asset check results)."""
    failed: dict[str, str] = {}
    run_id = context.run.run_id
    for asset in upstream:
        if (run_id, asset) in _FAILED:  # same process (in-process executor)
            for key in _FAILED[(run_id, asset)]:
                failed.setdefault(key, f"{asset} failed for this well earlier in the run")
            continue
        for key in _failed_wells_from_events(context, asset):  # another step process
            failed.setdefault(key, f"{asset} failed for this well earlier in the run")
    return failed


def _failed_wells_from_events(context: Any, asset: str) -> list[str]:
    from dagster import AssetCheckKey, AssetKey, DagsterEventType

    key = AssetCheckKey(AssetKey(asset), CHECK_WELLS)
    for entry in context.instance.all_logs(context.run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data
        if getattr(evaluation, "asset_check_key", None) == key:
            value = evaluation.metadata.get("failed_wells")
            return list(getattr(value, "value", None) or {})
    return []
