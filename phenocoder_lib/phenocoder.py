"""The :class:`Phenocoder` facade: the workflow guide's stateful API over the library's functions.

The class holds a SpatialData object, the location of the patch datasets and the model; every step
delegates to pure functions (``patches``, ``training``, ``encoding``, ``spatial``, ``embedding``).
The methods are grouped in mixins, one per part of the pipeline:

- :class:`~phenocoder_lib._facade_dataset.DatasetMixin`: ``add_sdata``, ``generate_dataset``;
- :class:`~phenocoder_lib._facade_model.ModelMixin`: ``initialize_model``, ``load_model``,
  ``summarize_model``, ``train``, ``encode``;
- :class:`~phenocoder_lib._facade_spatial.SpatialMixin`: ``cluster``, ``spatialgraph_stats``,
  ``spatialgraph_embedding``.

Shared state (attributes, all public and documented for notebook users):

``sdata``
    the SpatialData object (``add_sdata``).
``table_key``, ``sample_key``, ``image_key``, ``spatial_key``
    where data is found: ``sdata.tables[table_key]``, ``.obs[sample_key]``,
    ``sdata.images[f"{image_key}_{sample}"]``, ``.obsm[spatial_key]``.
``data_dir``, ``datasets``
    root folder of the patch datasets and the names generated so far (a list; it accumulates).
``model``, ``model_dir``, ``model_config``, ``model_name``
    the Keras model, its folder, its settings (a dict) and its (deterministic) name.
``adata``
    the spatial-statistics table (``spatialgraph_stats`` / ``spatialgraph_embedding``).
``seed``
    the seed every random choice of the facade derives from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._facade_dataset import DatasetMixin
from ._facade_model import ModelMixin
from ._facade_spatial import SpatialMixin
from .keys import DEFAULT_IMAGE_KEY, DEFAULT_SAMPLE_KEY, DEFAULT_TABLE_KEY, SPATIAL_KEY

_STATE_KEYS = (
    "sdata", "adata", "model", "model_dir", "model_config", "model_name", "sample_key", "spatial_key",
    "table_key", "image_key", "data_dir", "datasets", "dir_tensorboard", "seed",
)


class Phenocoder(DatasetMixin, ModelMixin, SpatialMixin):
    """Turn microscopy plates into spatially aware morphological embeddings.

    Parameters
    ----------
    sdata
        A SpatialData object laid out as in the workflow guide (or call :meth:`add_sdata` later).
    table_key
        Table of per-object features, ``sdata.tables[table_key]``.
    sample_key
        ``.obs`` column naming the sample (well) of each object.
    image_key
        Images are found as ``sdata.images[f"{image_key}_{sample}"]``.
    spatial_key
        Default ``.obsm`` key for patch indices when ``spatial_key_index`` is not given.
    seed
        Seed for every random choice (sample/patch draws, splits, weights, augmentation).
    **state
        Further attributes of the earlier library's constructor (``data_dir``, ``datasets``,
        ``model_dir``, ...). Unknown names raise a ``TypeError``.

    """

    def __init__(
        self,
        *,
        sdata: Any = None,
        table_key: str = DEFAULT_TABLE_KEY,
        sample_key: str = DEFAULT_SAMPLE_KEY,
        image_key: str = DEFAULT_IMAGE_KEY,
        spatial_key: str = SPATIAL_KEY,
        seed: int = 0,
        **state: Any,
    ) -> None:
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if unknown:
            raise TypeError(
                f"Phenocoder() got unknown keyword arguments {unknown}; valid: {sorted(_STATE_KEYS)}."
            )
        self.sdata = None
        self.adata = None
        self.table_key = table_key
        self.sample_key = sample_key
        self.image_key = image_key
        self.spatial_key = spatial_key
        self.seed = int(seed)
        self.data_dir: Path | None = None
        self.datasets: list[str] = []
        self.model = None
        self.model_dir: Path | None = None
        self.model_config: dict[str, Any] | None = None
        self.model_name: str | None = None
        self.dir_tensorboard: Path | None = None
        self.history: dict[str, list[float]] | None = None
        for key, value in state.items():
            setattr(self, key, value)
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir)
        self.datasets = list(self.datasets or [])
        if sdata is not None:
            self.add_sdata(sdata)

    def __repr__(self) -> str:
        lines = ["Phenocoder object with:"]
        sdata = "None" if self.sdata is None else f"{type(self.sdata).__name__} with {_describe_sdata(self.sdata)}"
        lines.append(f"    sdata: {sdata}")
        lines.append(f"    adata: {'None' if self.adata is None else f'{self.adata.n_obs} x {self.adata.n_vars}'}")
        lines.append(f"    model: {'None' if self.model is None else type(self.model).__name__}")
        keys = {k: getattr(self, k) for k in ("sample_key", "table_key", "image_key", "spatial_key")}
        lines.append("    config: " + ", ".join(f"{k}={v}" for k, v in keys.items() if v is not None))
        lines.append(f"    datasets: {len(self.datasets)} dataset(s)")
        return "\n".join(lines)


def _describe_sdata(sdata: Any) -> str:
    return f"{len(sdata.images)} images, {len(sdata.labels)} labels, {len(sdata.tables)} tables"
