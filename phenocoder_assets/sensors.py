"""New plates arrive on their own: a sensor on the landing folder.

Completion rule: a plate folder ``<landing>/<plate>/`` is complete when the exporter's marker file
``EXPORT_COMPLETE`` exists in it (``phenocoder_lib.ingest.EXPORT_COMPLETE_MARKER``) and, if
``PHENOCODER_QUIET_SECONDS`` is set (default 0), no file of the plate has been modified for that
many seconds. Until then the plate is reported as waiting.

For each complete plate the sensor registers one ``samples`` partition per well
(``f"{plate}_{well}"``) and requests runs of the ``sample_pipeline`` job: by default one run per
plate (``PHENOCODER_SENSOR_RUNS=plate``) over the range of its wells' partitions, which processes
the wells one after the other in the same processes and still records one materialization per
well (:mod:`phenocoder_assets.wells`; a well that fails is named by the ``every_well_processed``
check and does not stop its plate); wells that need different stages, or that are not adjacent in
the partition order, get runs of their own. ``PHENOCODER_SENSOR_RUNS=well`` requests one run per
well instead (each pays a process start and the imports: about 3x fewer wells per hour, see the
README's "Screen scale"). Runs carry ``dagster/max_retries`` (:data:`RUN_RETRIES`) so that an
instance with ``run_retries: enabled: true`` re-executes a run that failed from the failed step
on. The stages
requested are the ones that can run: ``sdata`` and ``patches`` always; ``latents`` once a model
has been trained; ``clusters`` and ``graph_stats`` once a cluster reference exists for that
model. Run keys are ``"<sample>:<content digest>:<model>/<reference>"``, where the digest covers
the names, sizes and modification times of the well's files; so the same plate never runs twice,
a re-exported well runs again, and a new model (a deliberate retraining) re-encodes the known
wells. Only stale stages are requested: the per-sample ``summary.json`` files record the source
digest (``sdata``), the model (``latents``) and the cluster reference (``graph_stats``) each
partition was computed from, so wells materialized by ``phenocoder demo`` or by hand are not
redone. The cursor remembers each plate's marker and folder times, so an unchanged landing
folder costs a few ``stat`` calls per plate. Refused and waiting plates are logged when that list
changes (the cursor keeps a digest of it), so an idle sensor writes nothing to its tick logs.

Safety: only direct sub-folders of the landing folder are considered; names must be valid plate
ids (letters, digits, ``_ . -``; no ``..``), symlinks are refused (the plate folder itself and
anything inside it), and every path must resolve inside the landing folder. Refused plates are
logged with the reason and never ingested.
"""

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from .archive import archived_plates
from .jobs import sample_pipeline_job
from .partitions import SAMPLES, partition_key_problem
from .resources import PhenocoderStorage
from .state import current_model_info, current_reference_info, model_tag
from .wells import DEFER_EVENTS_TAG, PLATE_RUN_TAG

QUIET_ENV = "PHENOCODER_QUIET_SECONDS"
MARKER = "EXPORT_COMPLETE"  # == phenocoder_lib.ingest.EXPORT_COMPLETE_MARKER (checked in the tests)
_PLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

INGEST_STAGES = ("sdata", "patches")
ENCODE_STAGES = ("latents",)
SPATIAL_STAGES = ("clusters", "graph_stats")
RUNS_ENV = "PHENOCODER_SENSOR_RUNS"
#: Run retries requested for the sensor's runs (honoured by an instance with ``run_retries`` enabled).
RUN_RETRIES = 2
RUN_RETRY_TAGS = {"dagster/max_retries": str(RUN_RETRIES), "dagster/retry_strategy": "FROM_FAILURE"}


def plate_problem(landing: Path, entry: os.DirEntry | Path) -> str | None:
    """Why the landing-folder entry must not be ingested, or ``None`` when it may be."""
    name = entry.name
    path = Path(entry.path if isinstance(entry, os.DirEntry) else entry)
    if not _PLATE_NAME.match(name) or ".." in name:
        return f"{name!r} is not a valid plate id (letters, digits, '_', '.', '-'; no '..')"
    if path.is_symlink():
        return f"{name!r} is a symbolic link; copy the export into the landing folder instead"
    if not path.is_dir():
        return f"{name!r} is not a folder"
    try:
        path.resolve(strict=True).relative_to(landing.resolve(strict=True))
    except (ValueError, OSError):
        return f"{name!r} resolves outside the landing folder {str(landing)!r}"
    return None


def _walk_files(plate_dir: Path) -> list[tuple[str, os.stat_result]]:
    """(relative path, stat) of every file of the plate; raises ValueError on a symlink anywhere."""
    out = []
    for dirpath, dirnames, filenames in os.walk(plate_dir, followlinks=False):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            if full.is_symlink():
                raise ValueError(f"{str(full.relative_to(plate_dir))!r} is a symbolic link (not followed)")
        for name in filenames:
            full = Path(dirpath, name)
            out.append((str(full.relative_to(plate_dir)), full.stat()))
    return out


def quick_signature(plate_dir: Path) -> str:
    """Cheap change detector: marker and folder modification times (no walk of the files)."""
    parts = []
    for p in [plate_dir / MARKER, plate_dir, *sorted(q for q in plate_dir.iterdir() if q.is_dir())]:
        st = p.lstat()
        parts.append(f"{p.name}:{st.st_mtime_ns}:{st.st_size}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def well_digests(plate_dir: Path, files: Any, walked: list[tuple[str, os.stat_result]]) -> dict[str, str]:
    """Per well: digest of (relative name, size, mtime) of its images, labels and tables.

    ``files`` is :func:`phenocoder_lib.ingest.scan_plate`'s result; ``walked`` holds stats already
    taken (the others are taken here).
    """
    stats = dict(walked)
    per_well: dict[str, list[Path]] = {w: [] for w in files.wells}
    for mapping in (files.images, files.labels, files.tables):
        for key, path in mapping.items():
            if key[0] in per_well:
                per_well[key[0]].append(path)
    digests = {}
    for well, paths in per_well.items():
        h = hashlib.sha1()
        for path in sorted(paths):
            rel = str(Path(path).relative_to(plate_dir))
            st = stats.get(rel) or Path(path).stat()
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        digests[well] = h.hexdigest()[:16]
    return digests


def downstream_stages(storage: PhenocoderStorage) -> tuple[tuple[str, ...], str, dict[str, Any] | None]:
    """(stages a well can run now, token naming the model/reference, model record)."""
    model = current_model_info(storage)
    if model is None:
        return INGEST_STAGES, "none", None
    tag = model_tag(model)
    ref = current_reference_info(storage)
    if ref is None or ref.get("model") != tag:
        return INGEST_STAGES + ENCODE_STAGES, tag, model
    return INGEST_STAGES + ENCODE_STAGES + SPATIAL_STAGES, f"{tag}+ref/{ref.get('id', '?')}", model


def patches_run_config(model: dict[str, Any] | None) -> dict[str, Any]:
    """Run config giving new wells patches with the settings the current model was trained on."""
    if not model or not model.get("patches"):
        return {}
    allowed = {"patch_size", "spatial_key_index", "scale", "scale_percentile", "scale_per_sample", "metadata_keys"}
    cfg = {k: v for k, v in model["patches"].items() if k in allowed}
    return {"ops": {"patches": {"config": cfg}}} if cfg else {}


def _summary(storage: PhenocoderStorage, asset: str, sample: str) -> dict[str, Any]:
    from .state import SUMMARY, read_json

    if not storage.exists(asset, sample):
        return {}
    path = storage.local_path(asset, sample) / SUMMARY
    return read_json(path) if path.exists() else {}


def stages_to_run(storage: PhenocoderStorage, sample: str, digest: str, available: tuple[str, ...],
                  model_tag: str, reference_id: str | None) -> list[str]:
    """Return the stages of ``available`` that are out of date for ``sample``, from the first stale one on.

    Up to date means: ``sdata`` was read from files with this ``digest``, ``latents`` were encoded by
    the current model and ``graph_stats`` used the current cluster reference. So a later
    ``dagster dev`` (or a reset cursor) does not redo what the demo or an earlier tick produced.
    """
    if _summary(storage, "sdata", sample).get("source_digest") != digest:
        first = "sdata"
    elif "latents" in available and _summary(storage, "latents", sample).get("model") != model_tag:
        first = "latents"
    elif "graph_stats" in available and \
            _summary(storage, "graph_stats", sample).get("reference_id") != reference_id:
        first = "clusters"
    else:
        return []
    return list(available[available.index(first):])


@sensor(
    job=sample_pipeline_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers the wells of complete plate exports in the landing folder as 'samples' partitions "
    "and requests their ingest -> patches -> latents -> clusters -> graph_stats runs.",
)
def incoming_plates_sensor(context: SensorEvaluationContext, storage: PhenocoderStorage):
    """See the module docstring."""
    from phenocoder_lib.ingest import sample_id, scan_plate

    landing = storage.landing_dir
    if not landing.is_dir():
        return SkipReason(f"landing folder {str(landing)!r} does not exist yet (create it and drop plate exports in).")
    cursor: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
    plates_seen: dict[str, str] = cursor.get("plates", {})
    quiet = float(os.environ.get(QUIET_ENV, "0") or 0)
    available, token, model = downstream_stages(storage)
    model_tag_now = model_tag(model) if model else "none"
    ref = current_reference_info(storage)
    reference_id = ref.get("id") if ref else None
    order = {k: i for i, k in enumerate(context.instance.get_dynamic_partitions(SAMPLES))}
    known = set(order)
    grouping = run_grouping()
    new_keys: list[str] = []
    requests: list[RunRequest] = []
    waiting, refused = [], []
    archived = archived_plates(storage)

    for entry in sorted(os.scandir(landing), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name in archived:
            continue
        problem = plate_problem(landing, entry)
        if problem:
            refused.append(problem)
            continue
        plate_dir = Path(entry.path)
        if not (plate_dir / MARKER).is_file():
            waiting.append(f"{entry.name!r}: no {MARKER} marker yet")
            continue
        signature = quick_signature(plate_dir)
        if plates_seen.get(entry.name) == f"{signature}:{token}":
            continue  # nothing changed since the last evaluation
        try:
            walked = _walk_files(plate_dir)
        except ValueError as err:
            refused.append(f"{entry.name!r}: {err}")
            continue
        if quiet > 0:
            newest = max((st.st_mtime for _, st in walked), default=0.0)
            if time.time() - newest < quiet:
                age = time.time() - newest
                waiting.append(f"{entry.name!r}: modified {age:.0f} s ago (quiet period {quiet:.0f} s)")
                continue
        try:
            files = scan_plate(plate_dir, plate=entry.name)
        except (OSError, ValueError, KeyError) as err:
            refused.append(f"{entry.name!r}: {err}")
            continue
        digests = well_digests(plate_dir, files, walked)
        plate_wells: list[tuple[str, str, str, tuple[str, ...]]] = []
        for well in files.wells:
            key = sample_id(entry.name, well)
            problem = partition_key_problem(key)
            if problem:
                refused.append(problem)
                continue
            if key not in known:
                new_keys.append(key)
                known.add(key)
                order[key] = len(order)  # registered in this order, after the known keys
            selection = stages_to_run(storage, key, digests[well], available, model_tag_now, reference_id)
            if not selection:
                continue
            plate_wells.append((key, well, digests[well], tuple(selection)))
        requests.extend(plate_run_requests(entry.name, plate_wells, order, token, model, grouping))
        plates_seen[entry.name] = f"{signature}:{token}"

    # Log a refused or waiting plate when that news changes, not on every evaluation (every 30 s).
    notes = sorted(f"refused {r}" for r in refused) + sorted(f"waiting for {r}" for r in waiting)
    logged = hashlib.sha1("\n".join(notes).encode()).hexdigest()[:12] if notes else ""
    if logged != cursor.get("logged", ""):
        for note in notes:
            (context.log.warning if note.startswith("refused") else context.log.info)(f"landing folder: {note}")
    new_cursor = json.dumps({"plates": plates_seen, **({"logged": logged} if logged else {})}, sort_keys=True)
    if not requests and not new_keys:
        detail = "; ".join((waiting + refused)[:5])
        return SensorResult(skip_reason=SkipReason("no new or changed plates" + (f" ({detail})" if detail else "")),
                            cursor=new_cursor)
    from dagster import AddDynamicPartitionsRequest

    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[AddDynamicPartitionsRequest(SAMPLES, new_keys)] if new_keys else [],
        cursor=new_cursor,
    )


def run_grouping() -> str:
    """``plate`` (default) or ``well``, from ``$PHENOCODER_SENSOR_RUNS``."""
    value = (os.environ.get(RUNS_ENV) or "plate").strip().lower()
    if value not in ("plate", "well"):
        raise ValueError(f"{RUNS_ENV}={value!r} must be 'plate' (one run per plate, the default) or 'well' "
                         "(one run per well).")
    return value


def plate_run_requests(plate: str, wells: list[tuple[str, str, str, tuple[str, ...]]], order: dict[str, int],
                       token: str, model: dict[str, Any] | None, grouping: str = "plate") -> list[RunRequest]:
    """Run requests for the wells of one plate that need work.

    ``wells`` holds ``(partition key, well, content digest, stages)``. With ``grouping="plate"``,
    wells that need the same stages and whose partitions are adjacent in ``order`` (the partition
    order of the ``samples`` definition) share one partition-range run; a lone well gets a plain
    one-partition run, exactly as with ``grouping="well"``.
    """
    groups: list[list[tuple[str, str, str, tuple[str, ...]]]] = []
    for item in sorted((w for w in wells if w[3]), key=lambda w: order[w[0]]):
        last = groups[-1][-1] if groups else None
        if (grouping == "plate" and last is not None and last[3] == item[3]
                and order[item[0]] == order[last[0]] + 1):
            groups[-1].append(item)
        else:
            groups.append([item])
    requests = []
    base_tags = {"phenocoder/plate": plate, "phenocoder/trigger": "incoming_plates", **RUN_RETRY_TAGS}
    for group in groups:
        selection = [_key(s) for s in group[0][3]]
        run_config = patches_run_config(model) if "patches" in group[0][3] else {}
        if len(group) == 1:
            key, well, digest, _ = group[0]
            requests.append(RunRequest(
                run_key=f"{key}:{digest}:{token}", partition_key=key, asset_selection=selection,
                run_config=run_config,
                tags={**base_tags, "phenocoder/well": well, "phenocoder/source_digest": digest}))
            continue
        first, last = group[0][0], group[-1][0]
        digest = hashlib.sha1("|".join(f"{k}:{d}" for k, _, d, _ in group).encode()).hexdigest()[:16]
        requests.append(RunRequest(
            run_key=f"{first}...{last}:{digest}:{token}", asset_selection=selection, run_config=run_config,
            tags={**base_tags, PLATE_RUN_TAG: plate, DEFER_EVENTS_TAG: "true",
                  ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last,
                  "phenocoder/wells": f"{group[0][1]}...{group[-1][1]} ({len(group)})",
                  "phenocoder/source_digest": digest}))
    return requests


def _key(name: str):
    from dagster import AssetKey

    return AssetKey(name)
