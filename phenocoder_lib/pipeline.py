"""Glue for running the workflow one partition at a time (used by the Dagster assets; no Dagster import).

The :class:`~phenocoder_lib.Phenocoder` facade keeps every patch dataset of a model in one folder
(``data_dir``) and writes the model under ``<data_dir>/models/<model_name>/``. A pipeline that stores
one dataset per sample and wants the model in a folder of its own uses :func:`train_on_datasets`:
it links the chosen dataset folders into a private ``data_dir`` inside the output folder, runs
``initialize_model`` and ``train`` there, and moves the model's files to the top of the output folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._facade_model import MODEL_CONFIG_FILE, MODEL_FILE
from .io import write_json_atomic

__all__ = ["TrainedModel", "load_trained_model", "train_on_datasets"]

_LINKS = ".datasets"


@dataclass
class TrainedModel:
    """What :func:`train_on_datasets` produced."""

    model: Any  #: the trained Keras model (best epoch)
    config: dict[str, Any]  #: ``model_config.json`` (parameters, condition encoding, dataset settings)
    history: dict[str, list[float]]  #: metrics per epoch
    folder: Path  #: the output folder


def train_on_datasets(
    dataset_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    sdata: Any = None,
    table_key: str,
    sample_key: str,
    image_key: str,
    spatial_key: str = "spatial",
    seed: int = 0,
    model_kwargs: Mapping[str, Any],
    train_kwargs: Mapping[str, Any],
) -> TrainedModel:
    """``initialize_model(**model_kwargs)`` then ``train(**train_kwargs)`` on the given patch datasets.

    Parameters
    ----------
    dataset_dirs
        Patch dataset folders (written by :func:`phenocoder_lib.patches.generate_dataset`); their
        names are the dataset names (the ``dataset`` condition).
    out_dir
        Output folder (created): ``model.keras``, ``model_config.json``, ``checkpoint.keras``,
        ``history.json``/``.csv``, ``history.png``, ``reconstructions.png``, ``latent_space.png`` and
        ``tensorboard/``. ``model_config['dir_dataset']`` is set to the datasets' common parent folder.
    sdata
        SpatialData whose table ``table_key`` holds ``.obs`` columns used as conditions (only needed for
        conditions that are not columns of the patch index).
    table_key, sample_key, image_key, spatial_key
        Keys of the facade (where the table, the sample column, the images and coordinates are).
    seed
        Seed of the facade (split, order, weights, sampling noise).
    model_kwargs, train_kwargs
        Arguments of ``Phenocoder.initialize_model`` and ``Phenocoder.train``.

    """
    from .phenocoder import Phenocoder

    dirs = [Path(d).resolve() for d in dataset_dirs]
    if not dirs:
        raise ValueError("dataset_dirs is empty: pass at least one patch dataset folder.")
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folders must have distinct names (they are the dataset names), got {names}.")
    out_dir = Path(out_dir)
    links = out_dir / _LINKS
    links.mkdir(parents=True, exist_ok=False)
    try:
        for d in dirs:
            (links / d.name).symlink_to(d, target_is_directory=True)
        pheno = Phenocoder(sdata=sdata, table_key=table_key, sample_key=sample_key, image_key=image_key,
                           spatial_key=spatial_key, seed=seed, data_dir=links, datasets=names)
        pheno.initialize_model(**dict(model_kwargs))
        history = pheno.train(**dict(train_kwargs))
        for item in Path(pheno.model_dir).iterdir():
            os.replace(item, out_dir / item.name)
        if pheno.dir_tensorboard is not None and Path(pheno.dir_tensorboard).exists():
            os.replace(pheno.dir_tensorboard, out_dir / "tensorboard")
    finally:
        shutil.rmtree(links, ignore_errors=True)
    config = dict(pheno.model_config)
    parents = {str(d.parent) for d in dirs}
    config["dir_dataset"] = parents.pop() if len(parents) == 1 else ""
    write_json_atomic(out_dir / MODEL_CONFIG_FILE, config)
    return TrainedModel(model=pheno.model, config=config, history=history, folder=out_dir)


def load_trained_model(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """(Keras model, ``model_config``) of a folder written by :func:`train_on_datasets` (or ``train``)."""
    from .phenocoder import Phenocoder

    pheno = Phenocoder()
    model = pheno.load_model(Path(folder) / MODEL_FILE)
    return model, pheno.model_config
