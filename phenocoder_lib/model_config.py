"""A model's settings and its ``model_config.json``: schema, deterministic name, migration of older files.

A model folder (written by :func:`phenocoder_lib.training.train`)::

    <folder>/
        model_config.json      every setting, the condition encoding (categories as JSON), the training
                               datasets' names and settings (geometry, normalization anchors), the split
                               and, after training, the training parameters and best epoch
        model.keras            the trained model (best epoch), loads with safe_mode=True
        checkpoint.keras       best-so-far model, written during training
        checkpoint.json        its epoch, val_loss, learning rate and SHA-1 (``train(resume=True)``)
        history.json/.csv      metrics per epoch
        history.png reconstructions.png latent_space.png   previews (``plot=True``)

The file carries ``format_version``; :func:`read_model_config` migrates an older schema in memory (with a
:class:`~phenocoder_lib.warnings.ModelSchemaWarning`) or says why it cannot. Importing this module does not
import TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .conditions import ConditionEncoder, condition_frame
from .keys import DEFAULT_IMAGE_KEY, DEFAULT_SAMPLE_KEY, DEFAULT_TABLE_KEY, SPATIAL_KEY
from .warnings import ModelSchemaWarning

__all__ = [
    "CHECKPOINT_FILE", "CONFIG_FORMAT_VERSION", "DEFAULT_MEMORY_BUDGET", "MODEL_CONFIG_FILE", "MODEL_FILE",
    "REQUIRED_CONFIG_KEYS", "ModelSettings", "build_model_config", "check_architecture", "check_same_as_training",
    "model_folder_files",
    "model_name", "read_model_config",
]

MODEL_CONFIG_FILE = "model_config.json"
MODEL_FILE = "model.keras"
CHECKPOINT_FILE = "checkpoint.keras"
CONFIG_FORMAT_VERSION = 1
#: Raw patches up to this size are held in RAM during training (``training.DEFAULT_MEMORY_BUDGET``, which
#: cannot be imported here without TensorFlow).
DEFAULT_MEMORY_BUDGET = 2**30
#: Keys of ``model_config.json`` that loading and encoding need; an older file lacking one cannot be migrated.
REQUIRED_CONFIG_KEYS = ("model_name", "model_class", "input_shape", "conditions", "datasets", "dir_dataset",
                        "dataset_settings")
#: Keys added after the first schema, with the value that reproduces the older behaviour.
CONFIG_DEFAULTS: dict[str, Any] = {"conditions_encoder": None, "batch_size": 64, "seed": 0, "shuffle": True,
                                   "validation_fraction": 0.2, "split_by": "object",
                                   "memory_budget_bytes": DEFAULT_MEMORY_BUDGET}
#: Settings that shape a training run, digested into the model name.
_NAME_KEYS = ("n_latent_dim", "n_dense_dim", "conditions", "conditions_encoder", "dropout", "batch_size",
              "input_shape", "conv_layers", "beta", "flip", "shuffle", "validation_fraction", "split_by",
              "seed", "datasets", "dataset_digest")


def check_architecture(
    input_shape: Sequence[int],
    conv_layers: Sequence[int],
    n_latent_dim: int,
    n_dense_dim: int,
    dropout: float | None,
    beta: float,
) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """Validate the architecture arguments and return them as int tuples.

    Parameters
    ----------
    input_shape
        (height, width, channels) of the patches.
    conv_layers
        Filters of the stride-2 convolutions; height and width must be divisible by ``2**len(conv_layers)``.
    n_latent_dim, n_dense_dim
        Latent size and width of the dense layer (positive ints).
    dropout
        Dropout rate in [0, 1), or ``None`` for no dropout layer.
    beta
        Weight of the KL term (>= 0).

    Returns
    -------
    tuple
        ``(input_shape, conv_layers)`` as int tuples.

    Raises
    ------
    ValueError, TypeError
        Naming the argument, the value received and the fix.
    """
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError) as err:
        raise TypeError(f"input_shape={input_shape!r} must be (height, width, channels), e.g. (32, 32, 4).") from err
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"input_shape={input_shape!r} must be three positive ints (height, width, channels), e.g. (32, 32, 4)."
        )
    try:
        convs = tuple(int(v) for v in conv_layers)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"conv_layers={conv_layers!r} must be a sequence of filter counts, e.g. (32, 64, 128)."
        ) from err
    if not convs or min(convs) < 1:
        raise ValueError(
            f"conv_layers={conv_layers!r} must hold at least one positive filter count, e.g. (32, 64, 128)."
        )
    factor = 2 ** len(convs)
    h, w, _ = shape
    if h % factor or w % factor:
        raise ValueError(
            f"input_shape={shape}: height {h} and width {w} must be divisible by 2**len(conv_layers) = {factor} "
            f"(conv_layers={convs} halves the image {len(convs)} times). Use a patch size that is a multiple of "
            f"{factor} or fewer conv_layers."
        )
    for name, value in (("n_latent_dim", n_latent_dim), ("n_dense_dim", n_dense_dim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int.")
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1) (or None for no dropout layer).")
    if not float(beta) >= 0.0:
        raise ValueError(f"beta={beta!r} must be a number >= 0 (the weight of the KL term).")
    return shape, convs  # type: ignore[return-value]


def _positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument}={value!r} must be a positive int.")
    return int(value)


@dataclass
class ModelSettings:
    """The settings of a model and its training batches, checked when made (see ``Phenocoder.initialize_model``).

    Parameters
    ----------
    n_latent_dim, n_dense_dim
        Latent size and width of the dense layer.
    conditions
        Condition columns (``[]`` or ``None``: a plain CVAE).
    dropout, beta
        Dropout after the dense layers; weight of the KL term.
    batch_size, n_workers
        Training batch size; batch-preparation threads.
    input_shape, conv_layers
        (height, width, channels) of the patches; filters of the stride-2 convolutions.
    flip, shuffle
        Dihedral augmentation; seeded reshuffle of the training patches every epoch.
    validation_fraction, split_by
        Share held out for validation; ``"object"`` (within each sample) or ``"sample"``.
    continuous_conditions
        Which conditions are continuous (default: ``z`` and float columns).
    seed
        Seed of the split, order, augmentation, weights and sampling noise.
    memory_budget_bytes
        Raw patches up to this size are held in RAM, larger datasets are streamed.

    """

    n_latent_dim: int
    n_dense_dim: int
    conditions: Sequence[str] | None = ()
    dropout: float | None = 0.25
    batch_size: int = 64
    n_workers: int = 1
    input_shape: Sequence[int] = (128, 128, 4)
    conv_layers: Sequence[int] = (8, 16, 32, 64, 128)
    beta: float = 0.01
    flip: bool = False
    shuffle: bool = True
    validation_fraction: float = 0.2
    split_by: Literal["object", "sample"] = "object"
    continuous_conditions: Sequence[str] | None = None
    seed: int = 0
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET

    def __post_init__(self) -> None:
        conditions = [] if self.conditions is None else self.conditions  # None: the guide's "no conditions"
        if isinstance(conditions, str):
            raise TypeError(f"conditions={conditions!r} must be a list of column names; pass [] for a plain CVAE.")
        self.conditions = [str(c) for c in conditions]
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"conditions={self.conditions} names a column twice.")
        self.batch_size = _positive_int(self.batch_size, "batch_size")
        self.n_workers = _positive_int(self.n_workers, "n_workers")
        self.seed = int(self.seed)
        self.input_shape, self.conv_layers = check_architecture(
            self.input_shape, self.conv_layers, self.n_latent_dim, self.n_dense_dim, self.dropout, self.beta)
        if not 0.0 < float(self.validation_fraction) < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction!r} must be strictly between 0 and 1.")
        if self.split_by not in ("object", "sample"):
            raise ValueError(f"split_by={self.split_by!r} is not valid; choose 'object' or 'sample'.")


def model_name(config: Mapping[str, Any]) -> str:
    """Deterministic name of a model: its main settings, the seed and a digest of the rest of the run.

    Parameters
    ----------
    config
        A model configuration (:func:`build_model_config`).

    Returns
    -------
    str
        E.g. ``cond_latent_32_dense_64_dropout_0.25_beta_0.01_seed_0_1a2b3c4d``.
    """
    blob = json.dumps({k: config.get(k) for k in _NAME_KEYS}, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
    prefix = "cond_" if config["conditions"] else ""
    return (f"{prefix}latent_{config['n_latent_dim']}_dense_{config['n_dense_dim']}_dropout_{config['dropout']}"
            f"_beta_{config['beta']}_seed_{config['seed']}_{digest}")


def build_model_config(
    settings: ModelSettings,
    datasets: Sequence[Any],
    *,
    index: pd.DataFrame,
    keys: Mapping[str, str],
    obs: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The ``model_config.json`` of a new model: settings, fitted condition encoding, datasets, name.

    Parameters
    ----------
    settings
        The model's settings.
    datasets
        The training :class:`~phenocoder_lib.patches.PatchDataset` objects.
    index
        Their patch index (``training.training_index``), for the condition encoding.
    keys
        ``table_key``, ``sample_key``, ``image_key`` and ``spatial_key`` of the source data.
    obs
        The source table's ``.obs``, for conditions that are not columns of the patch index.

    Returns
    -------
    dict
        The configuration (JSON-compatible), ``model_name`` included.
    """
    from . import __version__

    s = settings
    enc = None
    if s.conditions:
        frame = condition_frame(s.conditions, index=index, sample_key=keys["sample_key"], obs=obs)
        enc = ConditionEncoder.fit(frame, s.conditions, continuous=s.continuous_conditions)
    dataset_settings = {ds.name: ds.settings for ds in datasets}
    parents = {str(Path(ds.path).resolve().parent) for ds in datasets}
    config: dict[str, Any] = {
        "format_version": CONFIG_FORMAT_VERSION,
        "model_class": "CondCVAE" if s.conditions else "CVAE",
        "conditional": bool(s.conditions),
        **{k: v for k, v in asdict(s).items() if k not in ("continuous_conditions",)},
        "conditions_encoder": enc.to_dict() if enc is not None else None,
        "conditions_dim": enc.width if enc is not None else 0,
        "condition_features": enc.feature_names if enc is not None else [],
        "dropout": None if s.dropout is None else float(s.dropout),
        "input_shape": list(s.input_shape),
        "conv_layers": list(s.conv_layers),
        "beta": float(s.beta),
        "n_latent_dim": int(s.n_latent_dim),
        "n_dense_dim": int(s.n_dense_dim),
        "flip": bool(s.flip),
        "shuffle": bool(s.shuffle),
        "validation_fraction": float(s.validation_fraction),
        "dir_dataset": parents.pop() if len(parents) == 1 else "",
        "datasets": [ds.name for ds in datasets],
        "dataset_settings": dataset_settings,
        "dataset_digest": hashlib.sha1(json.dumps(dataset_settings, sort_keys=True).encode()).hexdigest()[:12],
        "keys": dict(keys),
        "memory_budget_bytes": int(s.memory_budget_bytes),
    }
    config["model_name"] = model_name(config)
    config["phenocoder_version"] = __version__
    return config


def model_folder_files(path: str | Path) -> tuple[Path, Path]:
    """The model folder and the ``.keras`` file to load, from a folder, its config or a ``.keras`` file.

    Parameters
    ----------
    path
        A model folder, its ``model_config.json``, or a ``.keras`` file inside it (e.g. ``checkpoint.keras``).

    Returns
    -------
    tuple of Path
        ``(folder, keras_file)``.

    Raises
    ------
    FileNotFoundError
        When the path is none of these, or the folder lacks its config or the ``.keras`` file.
    """
    path = Path(path)
    if path.is_dir():
        folder, keras_path = path, path / MODEL_FILE
    elif path.suffix == ".keras":
        folder, keras_path = path.parent, path
    elif path.name == MODEL_CONFIG_FILE:
        folder, keras_path = path.parent, path.parent / MODEL_FILE
    else:
        raise FileNotFoundError(f"load_model(path={str(path)!r}): not a model folder, model_config.json or "
                                ".keras file.")
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"{str(config_path)!r} does not exist; pass a model folder written by "
                                "initialize_model()/train().")
    if not keras_path.exists():
        hint = f" An interrupted run left {str(folder / CHECKPOINT_FILE)!r}; pass it as path." if (
            folder / CHECKPOINT_FILE).exists() else " Run train() first."
        raise FileNotFoundError(f"{str(keras_path)!r} does not exist.{hint}")
    return folder, keras_path


def read_model_config(config_path: str | Path) -> dict[str, Any]:
    """Read ``model_config.json``, migrating an older schema in memory.

    A file without ``format_version`` is schema 0. Older files that hold every key of
    :data:`REQUIRED_CONFIG_KEYS` are migrated (missing optional keys get the values that reproduce the
    older behaviour) with a :class:`~phenocoder_lib.warnings.ModelSchemaWarning`.

    Parameters
    ----------
    config_path
        The ``model_config.json`` file.

    Returns
    -------
    dict
        The configuration in the current schema.

    Raises
    ------
    ValueError
        Naming the file: not JSON, not a mapping, a newer schema, or an older one lacking required keys.
    """
    config_path = Path(config_path)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON ({err}); the model folder is damaged: "
                         "retrain the model or restore the folder from a backup.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} holds a {type(config).__name__}, not a model configuration; "
                         "pass a model folder written by initialize_model()/train().")
    found = config.get("format_version", 0)
    if not isinstance(found, int) or found > CONFIG_FORMAT_VERSION:
        raise ValueError(f"{str(config_path)!r} has format_version={found!r}; this Phenocoder reads versions up to "
                         f"{CONFIG_FORMAT_VERSION}. Upgrade phenocoder to load this model.")
    if found < CONFIG_FORMAT_VERSION:
        missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(
                f"{str(config_path)!r} has format_version={found!r} (older than {CONFIG_FORMAT_VERSION}) and lacks "
                f"{missing}, so it cannot be migrated. Retrain the model (initialize_model() and train(), or "
                "materialize the 'model' asset) to write the current schema.")
        added = [k for k in CONFIG_DEFAULTS if k not in config]
        for key in added:
            config[key] = CONFIG_DEFAULTS[key]
        config.setdefault("keys", {"table_key": DEFAULT_TABLE_KEY, "sample_key": DEFAULT_SAMPLE_KEY,
                                   "image_key": DEFAULT_IMAGE_KEY, "spatial_key": SPATIAL_KEY})
        config["migrated_from_format_version"] = found
        config["format_version"] = CONFIG_FORMAT_VERSION
        warnings.warn(f"{str(config_path)!r} has format_version={found!r}; migrated to {CONFIG_FORMAT_VERSION} in "
                      f"memory (defaults for {added}). Retrain or re-save the model to silence this warning.",
                      ModelSchemaWarning, stacklevel=3)
    return config


def check_same_as_training(config: Mapping[str, Any], **given: Any) -> None:
    """Check that encoding settings equal those the training datasets were made with.

    Parameters
    ----------
    config
        The model configuration.
    **given
        ``scale``, ``scale_per_sample``, ``scale_percentile``, ``spatial_key_index``; ``None`` skips the check.

    Returns
    -------
    None
        Raises a ``ValueError`` naming the argument and the stored value on a mismatch.
    """
    first = config["dataset_settings"][config["datasets"][0]]
    stored_values = {**first["normalization"], "spatial_key_index": first["spatial_key_index"]}
    for argument, value in given.items():
        stored = stored_values[argument]
        if value is None:
            continue
        same = (float(value) == float(stored)) if argument == "scale_percentile" else (value == stored)
        if not same:
            raise ValueError(
                f"encode({argument}={value!r}) disagrees with the training datasets, which were made with "
                f"{argument}={stored!r} (dataset {config['datasets'][0]!r}); encoding must crop and normalize "
                f"as in training. Pass {argument}={stored!r} or leave it out."
            )
