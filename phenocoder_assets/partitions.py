"""The ``samples`` partitions: one dynamic partition per plate and well (``f"{plate}_{well}"``).

Keys are validated before they are registered: the instance API accepts any string, but ``/``
becomes a folder on disk, ``|`` and ``,`` separate keys in the UI and in multi-partition keys, and
``...`` is the UI's range syntax. A key is the sample id of :func:`phenocoder_lib.ingest.sample_id`,
so it names the sample's folder under every asset of the storage root.
"""

from __future__ import annotations

import re

from dagster import DynamicPartitionsDefinition

#: Name of the dynamic partitions definition (``instance.add_dynamic_partitions("samples", keys)``).
SAMPLES = "samples"

samples_partitions = DynamicPartitionsDefinition(name=SAMPLES)

# Same alphabet as phenocoder_lib.ingest plate ids; wells are letters + digits (A01, AB12).
_PLATE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_WELL = r"[A-Za-z]{1,2}\d{1,3}"
_KEY = re.compile(rf"^(?P<plate>{_PLATE})_(?P<well>{_WELL})$")
MAX_KEY_LENGTH = 128


def partition_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid sample partition key, or ``None`` when it is valid."""
    if not isinstance(key, str) or not key:
        return f"partition key {key!r} must be a non-empty string"
    if len(key) > MAX_KEY_LENGTH:
        return f"partition key {key[:40]!r}... is longer than {MAX_KEY_LENGTH} characters"
    for bad in ("/", "\\", "|", ",", ".."):
        if bad in key:
            return (f"partition key {key!r} contains {bad!r} (not allowed: '/', '\\', '|', ',', '..'; "
                    "rename the plate folder)")
    if _KEY.match(key) is None:
        return (f"partition key {key!r} is not '<plate>_<well>' with a plate id of letters, digits, '_', '.', '-' "
                "and a well such as 'A01'")
    return None


def validate_partition_key(key: str) -> str:
    """Return ``key`` or raise ``ValueError`` saying what is wrong with it."""
    problem = partition_key_problem(key)
    if problem is not None:
        raise ValueError(problem + ".")
    return key


def split_sample(key: str) -> tuple[str, str]:
    """``"PLATE_1_A01"`` -> ``("PLATE_1", "A01")``: the well is the part after the last underscore."""
    match = _KEY.match(validate_partition_key(key))
    assert match is not None  # validated above
    return match["plate"], match["well"]
