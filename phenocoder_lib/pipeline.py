"""The workflow one partition at a time, for the Dagster assets (no Dagster import).

Each stage is a function from files and settings to a typed result that carries what the asset
records; the :class:`~phenocoder_lib.Phenocoder` facade and these functions both call the library
functions that do the work (e.g. :func:`phenocoder_lib.training.train`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import write_json_atomic

__all__ = ["EncodedWell", "NORMALIZATION_FILE", "encode_well", "train_model"]


# --- model chain ---

#: Beside the model: per training dataset, the patch geometry and normalization that encoding reproduces.
NORMALIZATION_FILE = "normalization.json"


def train_model(
    dataset_dirs: Sequence[str | Path],
    out_dir: str | Path,
    settings: Mapping[str, Any],
    *,
    keys: Mapping[str, str],
    obs: Any = None,
    **train_kwargs: Any,
) -> Any:
    """Train a model on per-sample patch dataset folders and write its folder (``out_dir``, created).

    Parameters
    ----------
    dataset_dirs
        Patch dataset folders (:func:`phenocoder_lib.patches.generate_dataset`); their names are the
        dataset names (the ``dataset`` condition) and must be distinct.
    out_dir
        The model folder: ``model.keras``, ``model_config.json``, ``checkpoint.keras``, ``history.json``/``.csv``,
        the previews, :data:`NORMALIZATION_FILE` and ``tensorboard/``.
    settings
        Fields of :class:`~phenocoder_lib.model_config.ModelSettings`.
    keys
        ``table_key``, ``sample_key``, ``image_key`` (and ``spatial_key``) of the source data.
    obs
        The training objects' ``.obs``, for conditions that are not columns of the patch index.
    **train_kwargs
        Arguments of :func:`phenocoder_lib.training.train` (``n_epochs``, ``on_epoch_end``, ...).

    Returns
    -------
    phenocoder_lib.training.TrainedModel
        The trained model, its configuration, history and folder.
    """
    from . import training
    from .patches import PatchDataset

    dirs = [Path(d) for d in dataset_dirs]
    if not dirs:
        raise ValueError("dataset_dirs is empty: pass at least one patch dataset folder.")
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folders must have distinct names (they are the dataset names), got {names}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = training.train([PatchDataset.open(d) for d in dirs], out_dir, settings, keys=keys, obs=obs,
                             log_dir=out_dir / "tensorboard", **train_kwargs)
    write_json_atomic(out_dir / NORMALIZATION_FILE, {
        name: {k: ds[k] for k in ("patch_size", "channels", "spatial_key_index", "normalization")}
        for name, ds in trained.config["dataset_settings"].items()})
    return trained


@dataclass
class EncodedWell:
    """The latents of one well and the checks on them.

    Parameters
    ----------
    table
        The ``phenocoder`` table of the well (:func:`phenocoder_lib.encoding.encode_table`).
    n_expected
        Objects of the well's source table.
    missing
        Those without a latent (sorted names; expected empty).
    n_non_finite
        NaN or infinite latent values (expected 0).
    pcs
        (n, 2) coordinates of the latents on their first two principal axes, for a preview (``None``
        below two objects).
    """

    table: Any
    n_expected: int
    missing: list[str]
    n_non_finite: int
    pcs: Any = None


def encode_well(
    trained: Any,
    sdata: Any,
    sample: str,
    *,
    keys: Mapping[str, str],
    spatial_key: str = "spatial",
    batch_size: int = 512,
    spatial_message_passing_radius: float | None = None,
    data_dir: str | Path | None = None,
) -> EncodedWell:
    """Encode the objects of one well with a trained model and check the result.

    Parameters
    ----------
    trained
        A :class:`~phenocoder_lib.training.TrainedModel` (e.g. :func:`phenocoder_lib.training.load_model`).
    sdata
        SpatialData holding the well's table and images.
    sample
        The well (a value of the sample column).
    keys
        ``table_key``, ``sample_key`` and ``image_key`` of ``sdata``.
    spatial_key, batch_size, spatial_message_passing_radius
        See :func:`phenocoder_lib.encoding.encode_table`.
    data_dir
        Folder of the training patch datasets (their stored patches are reused when they match).

    Returns
    -------
    EncodedWell
        The table, the objects without a latent, the count of non-finite values and the preview's PCs.
    """
    import numpy as np

    from .encoding import encode_table
    from .plotting import principal_components

    out = encode_table(trained.model, sdata, model_config=trained.config, table_key=keys["table_key"],
                       sample_key=keys["sample_key"], image_key=keys["image_key"], spatial_key=spatial_key,
                       batch_size=batch_size, spatial_message_passing_radius=spatial_message_passing_radius,
                       data_dir=data_dir, samples=[sample])
    x = np.asarray(out.X)
    expected = set(sdata.tables[keys["table_key"]].obs_names.astype(str))
    missing = sorted(expected - set(out.obs_names.astype(str)))
    pcs = principal_components(x) if out.n_obs >= 2 else None
    return EncodedWell(table=out, n_expected=len(expected), missing=missing,
                       n_non_finite=int((~np.isfinite(x)).sum()), pcs=pcs)
