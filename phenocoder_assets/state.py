"""Small JSON records that link the cross-sample assets: which model and cluster reference are current.

Read by the sensor (to pick the stages a new well can run) and by the per-sample assets
(to record and check what they were computed with).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .resources import PhenocoderStorage

MODEL_INFO = "model_info.json"
REFERENCE_INFO = "reference_info.json"
SUMMARY = "summary.json"


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file."""
    return json.loads(Path(path).read_text())


def _read_local(storage: PhenocoderStorage, asset: str, name: str) -> dict[str, Any] | None:
    if not storage.exists(asset):
        return None
    path = storage.local_path(asset) / name
    return read_json(path) if path.exists() else None


def current_model_info(storage: PhenocoderStorage) -> dict[str, Any] | None:
    """``model_info.json`` of the materialized ``model`` (registry name/version, patch settings), or None."""
    return _read_local(storage, "model", MODEL_INFO)


def current_reference_info(storage: PhenocoderStorage) -> dict[str, Any] | None:
    """``reference_info.json`` of the materialized ``cluster_reference`` (id, model version), or None."""
    return _read_local(storage, "cluster_reference", REFERENCE_INFO)


def model_tag(info: dict[str, Any] | None) -> str:
    """Name a model record as ``"<registered name>/<version>"`` (``"none"`` without a model)."""
    if not info:
        return "none"
    return f"{info.get('registered_model_name', 'model')}/{info.get('version', info.get('model_id', '?'))}"
