"""Archiving finished plates: their wells leave the live ``samples`` partitions.

Every Dagster query over a partitioned asset (the partitions view, ``partitionStats``) reads all
the partitions of the definition; at 10^5 wells it took 4-8 s on the development machine, and 0.8-1.4 s
once 90 % of the plates were archived (README, "Screen scale"). Archiving removes a plate's wells
from the ``samples`` partitions definition; their files under the storage root and the instance's
event history stay, and the landing-folder sensor does not register the plate again (the list of
archived plates is ``<landing>/.archived_plates.json``; the sensor ignores hidden entries).
Restoring a plate is :func:`restore_plates` (its wells are registered again; nothing is recomputed
unless its files changed).
"""

from __future__ import annotations

import json
from typing import Any

from .partitions import SAMPLES, split_sample
from .resources import PhenocoderStorage

ARCHIVE_FILE = ".archived_plates.json"


def archived_plates(storage: PhenocoderStorage) -> set[str]:
    """Plates archived so far (empty when none)."""
    path = storage.landing_dir / ARCHIVE_FILE
    if not path.is_file():
        return set()
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ValueError(f"{str(path)!r} must hold a JSON list of plate ids; found {type(data).__name__}. "
                         "Fix or delete the file.")
    return set(data)


def _write(storage: PhenocoderStorage, plates: set[str]) -> None:
    from phenocoder_lib.io import write_json_atomic

    storage.landing_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(storage.landing_dir / ARCHIVE_FILE, sorted(plates))


def _plate_keys(instance: Any, plates: set[str]) -> list[str]:
    return [k for k in instance.get_dynamic_partitions(SAMPLES) if split_sample(k)[0] in plates]


def archive_plates(instance: Any, storage: PhenocoderStorage, plates: list[str]) -> list[str]:
    """Remove the wells of ``plates`` from the live partitions; returns the partition keys removed."""
    wanted = set(plates)
    unknown = wanted - {split_sample(k)[0] for k in instance.get_dynamic_partitions(SAMPLES)} - archived_plates(storage)
    if unknown:
        raise ValueError(f"plates {sorted(unknown)} have no 'samples' partitions; give plate ids as in the "
                         "landing folder (the part of a partition key before the well).")
    keys = _plate_keys(instance, wanted)
    for key in keys:
        instance.delete_dynamic_partition(SAMPLES, key)
    _write(storage, archived_plates(storage) | wanted)
    return keys


def restore_plates(storage: PhenocoderStorage, plates: list[str]) -> None:
    """Let the sensor register ``plates`` again (reset the sensor's cursor, or touch the plate folder)."""
    _write(storage, archived_plates(storage) - set(plates))
