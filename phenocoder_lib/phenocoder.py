"""The workflow guide's stateful API: each step calls patches, training, encoding, clustering, spatial or embedding."""

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from . import patches as _patches
from ._docs import delegates_to
from .keys import DEFAULT_IMAGE_KEY, DEFAULT_SAMPLE_KEY, DEFAULT_TABLE_KEY, PHENOCODER_TABLE, SPATIAL_KEY
from .model_config import DEFAULT_MEMORY_BUDGET, ModelSettings, _positive_int, check_same_as_training
from .validation import check_key, require

_KEYS = ("sample_key", "table_key", "image_key", "spatial_key")
_NO_MODEL = "No model: call initialize_model(...) (and train()) or load_model(path) first."
_CHECKED = ("scale", "scale_per_sample", "scale_percentile", "spatial_key_index")
_STATE = ("sdata", "adata", "model", "model_dir", "model_config", "model_name", *_KEYS, "data_dir", "datasets",
          "dir_tensorboard", "seed")


def _args(scope: dict[str, Any], *leave_out: str) -> dict[str, Any]:
    """A method's arguments (its ``locals()`` at the top) without ``self`` and ``leave_out``."""
    return {k: v for k, v in scope.items() if k not in ("self", *leave_out)}


class Phenocoder:
    """Turn microscopy plates into spatially aware morphological embeddings (the workflow guide's API).

    Parameters
    ----------
    sdata, table_key, sample_key, image_key, spatial_key, seed
        SpatialData (or :meth:`add_sdata` later), its table, ``.obs`` sample column, images
        ``f"{image_key}_{sample}"``, default ``.obsm`` key of patch indices; the seed of every random choice.
    **state
        Further public attributes (``data_dir``, ``datasets``, ``model_dir``, ...); others raise a ``TypeError``.
    """

    def __init__(self, *, sdata: Any = None, table_key: str = DEFAULT_TABLE_KEY, sample_key: str = DEFAULT_SAMPLE_KEY,
                 image_key: str = DEFAULT_IMAGE_KEY, spatial_key: str = SPATIAL_KEY, seed: int = 0,
                 **state: Any) -> None:
        unknown = sorted(set(state) - set(_STATE))
        require(not unknown, f"Phenocoder() got unknown keyword arguments {unknown}; valid: {sorted(_STATE)}.",
                TypeError)
        vars(self).update(dict.fromkeys((*_STATE, "history", "model_oh_enc", "_batches")), seed=int(seed), **state,
                          table_key=table_key, sample_key=sample_key, image_key=image_key, spatial_key=spatial_key)
        self.data_dir, self.datasets = None if self.data_dir is None else Path(self.data_dir), list(self.datasets or [])
        if sdata is not None:
            self.add_sdata(sdata)

    def __repr__(self) -> str:
        s, a, m = self.sdata, self.adata, self.model
        sd = "None" if s is None else f"{type(s).__name__} with {len(s.images)} images, {len(s.labels)} labels, " \
            f"{len(s.tables)} tables"
        keys = ", ".join(f"{k}={getattr(self, k)}" for k in _KEYS if getattr(self, k) is not None)
        return (f"Phenocoder object with:\n    sdata: {sd}\n    adata: "
                f"{'None' if a is None else f'{a.n_obs} x {a.n_vars}'}\n    model: "
                f"{'None' if m is None else type(m).__name__}\n    config: {keys}\n    datasets: "
                f"{len(self.datasets)} dataset(s)")

    def add_sdata(self, sdata: Any) -> None:
        """Attach a SpatialData object (images ``f"{image_key}_{sample}"``, tables, labels).

        Parameters
        ----------
        sdata
            The SpatialData object.
        """
        require(hasattr(sdata, "tables") and hasattr(sdata, "images"),
                f"sdata must be a spatialdata.SpatialData object, got {type(sdata).__name__}.", TypeError)
        self.sdata = sdata

    def _table(self, key: str | None = None, required: bool = True) -> Any:
        require(self.sdata is not None, "No SpatialData attached: call pheno.add_sdata(sdata) first.")
        key = self.table_key if key is None else key
        if required:
            check_key(self.sdata.tables, key, argument="table_key", what="table of sdata.tables",
                      fix="Run encode() first for the 'phenocoder' table, or pass the name of a feature table.")
            require(self.sample_key is not None, "sample_key is None: set Phenocoder(sample_key=...).")
        return self.sdata.tables.get(key)

    def _keys(self, *leave_out: str) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _KEYS if k not in leave_out}

    @delegates_to("phenocoder_lib.patches.generate_dataset")
    def generate_dataset(self, dataset: str, dir_dataset: str | Path, patch_size: int | Sequence[int] = (128, 128),
                         spatial_key_index: str | None = None, scale: bool = True,
                         metadata_keys: Sequence[str] | None = None, scale_percentile: float = 1.0,
                         scale_per_sample: bool = True, n_samples: int | None = None, n_patches: int | None = None,
                         *, progress: bool = True) -> _patches.PatchDataset:
        """Extract a patch around every object into ``<dir_dataset>/<dataset>/`` and add it to ``datasets``.

        A model's datasets share ``dir_dataset`` (the same name replaces a dataset); ``spatial_key_index``
        defaults to ``"spatial_index"`` when the table has it, else ``spatial_key``; the seed is ``self.seed``.
        """
        args, table = _args(locals()), self._table(required=False)
        if spatial_key_index is None:  # the integer twin of spatial_key when the table has one
            has_index = "spatial_index" in getattr(table, "obsm", {})
            args["spatial_key_index"] = "spatial_index" if has_index else self.spatial_key
        args["dir_dataset"] = dir_dataset = Path(dir_dataset)
        require(self.data_dir is None or Path(self.data_dir) == dir_dataset or not self.datasets,
                f"dir_dataset={str(dir_dataset)!r} differs from the folder of the earlier datasets "
                f"({str(self.data_dir)!r}, datasets {self.datasets}); keep all datasets of a model in one folder.")
        result = _patches.generate_dataset(self.sdata, **args, **self._keys("spatial_key"), seed=self.seed)
        self.data_dir, self.datasets = dir_dataset, self.datasets + [dataset] * (dataset not in self.datasets)
        return result

    def open_datasets(self) -> list[_patches.PatchDataset]:
        """Open the patch datasets generated so far (``data_dir / name`` for each of ``datasets``).

        Returns
        -------
        list of PatchDataset
        """
        require(self.data_dir is not None and bool(self.datasets),
                "No patch dataset yet: call pheno.generate_dataset(...) first.")
        return [_patches.PatchDataset.open(Path(self.data_dir) / name) for name in self.datasets]

    @delegates_to("phenocoder_lib.model_config.ModelSettings",
                  "keras.Model\n    The built (untrained) model, also ``self.model``.")
    def initialize_model(self, n_latent_dim: int, n_dense_dim: int, conditions: Sequence[str] | None,
                         dropout: float | None = 0.25, batch_size: int = 64, n_workers: int = 1,
                         input_shape: Sequence[int] = (128, 128, 4), conv_layers: Sequence[int] = (8, 16, 32, 64, 128),
                         beta: float = 0.01, flip: bool = False, shuffle: bool = True, *,
                         validation_fraction: float = 0.2, split_by: Literal["object", "sample"] = "object",
                         continuous_conditions: Sequence[str] | None = None, seed: int | None = None,
                         memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> Any:
        """Build a CVAE (a CondCVAE with ``conditions``) and its batches; write ``<data_dir>/models/<model_name>/``.

        ``seed`` defaults to ``self.seed``; TensorBoard logs go to ``<data_dir>/tensorboard_logs/<model_name>``.
        """
        settings = ModelSettings(**_args(locals(), "seed"), seed=self.seed if seed is None else seed)
        from . import training
        datasets, data_dir = self.open_datasets(), Path(self.data_dir)
        self._adopt(training.prepare(datasets, data_dir / "models", settings, keys=self._keys(), obs=self._obs(),
                                     log_dir=data_dir / "tensorboard_logs", name_folders=True))
        return self.model

    def _obs(self) -> Any:
        return getattr(self.sdata.tables.get(self.table_key), "obs", None) if self.sdata is not None else None

    def _adopt(self, run: Any) -> None:
        self.model, self.model_config, self.model_dir, self.history = run.model, run.config, run.folder, run.history
        self.model_name, self.model_oh_enc, self._batches = run.config["model_name"], run.conditions, run.batches
        self.dir_tensorboard = run.log_dir or self.dir_tensorboard

    def load_model(self, path: str | Path | None = None) -> Any:
        """Restore a model, its condition encoding and dataset settings (works in a fresh process).

        Parameters
        ----------
        path
            Model folder, its ``model_config.json`` or a ``.keras`` file in it; default ``self.model_dir``.

        Returns
        -------
        keras.Model
        """
        from . import training
        require(path is not None or self.model_dir is not None,
                "load_model(): no path given and no model_dir set; pass the model folder (<data_dir>/models/<name>).")
        self._adopt(training.load_model(self.model_dir if path is None else path))
        self.data_dir, self.datasets = Path(self.model_config["dir_dataset"]), list(self.model_config["datasets"])
        self.dir_tensorboard = self.data_dir / "tensorboard_logs" / self.model_name
        return self.model

    def summarize_model(self) -> str:
        """Print the configuration and the layer tables (:func:`phenocoder_lib.models.summarize`).

        Returns
        -------
        str
        """
        from .models import summarize
        require(self.model is not None and self.model_config is not None, _NO_MODEL)
        print(text := summarize(self.model, self.model_config))
        return text

    @delegates_to("phenocoder_lib.training.train", "dict of str to list of float\n    The history: one value per "
                  "epoch of each loss and metric, also ``self.history``.")
    def train(self, n_epochs: int = 100, learning_rate: float = 1e-3, min_learning_rate: float = 1e-4,
              factor_learning_rate: float = 0.2, learning_rate_patience: int = 3, early_stopping_patience: int = 5,
              plot: bool = True, n_preview: int = 300, plot_frac: float = 0.001, *, verbose: int | str = "auto",
              on_epoch_end: Any = None, resume: bool = False) -> dict[str, list[float]]:
        """Fit the model; save it, its history (returned: per-epoch lists), checkpoint and previews in ``model_dir``."""
        args = _args(locals())
        from . import training
        require(self.model is not None and self.model_config is not None, _NO_MODEL)
        start = training.TrainedModel(self.model, self.model_config, Path(self.model_dir), self.dir_tensorboard,
                                      self.model_oh_enc, self.history, self._batches)
        self._adopt(training.train(self.open_datasets(), self.model_dir, None, obs=self._obs(), start=start, **args))
        return self.history

    @delegates_to("phenocoder_lib.encoding.encode_table")
    def encode(self, batch_size: int = 512, scale: bool | None = None, spatial_key_index: str | None = None,
               scale_percentile: float | None = None, scale_per_sample: bool | None = None,
               spatial_message_passing_radius: float | None = None, *, samples: Sequence[str] | None = None,
               table_name: str = PHENOCODER_TABLE, use_store: bool = True, progress: bool = True) -> Any:
        """Encode every object (``z_mean``) into ``sdata.tables[table_name]`` (replaced), as normalized in training.

        Parameters
        ----------
        scale, spatial_key_index, scale_percentile, scale_per_sample
            Optional checks: when given they must equal the training datasets' values (else ``ValueError``).
        table_name
            Name of the new table in ``sdata.tables``.
        """
        args = _args(locals(), "table_name")
        from .encoding import encode_table
        require(self.model is not None and self.model_config is not None, _NO_MODEL)
        self._table(required=False)
        check_same_as_training(self.model_config, **{k: args.pop(k) for k in _CHECKED})
        args["batch_size"] = _positive_int(batch_size, "batch_size")
        table = encode_table(self.model, self.sdata, model_config=self.model_config, **self._keys(), **args,
                             data_dir=self.data_dir)
        self.sdata.tables.pop(table_name, None)
        self.sdata.tables[table_name] = table
        return table

    @delegates_to("phenocoder_lib.clustering.cluster_features", "ClusterReference\n    The reference that labels "
                  "later tables consistently (the one given, when ``reference`` is set).")
    def cluster(self, table_key: str | None = None, *, key_added: str = "leiden", use_rep: str | None = None,
                layer: str | None = None, scale: bool = True, n_pcs: int = 50, n_neighbors: int = 15,
                resolution: float = 1.0, reference: Any = None, transfer_k: int | None = None) -> Any:
        """Cluster a table's objects (seeded Leiden) into ``.obs[key_added]``; return the reference.

        Parameters
        ----------
        table_key
            Table to cluster (default ``self.table_key``).
        key_added
            ``.obs`` column of the labels.
        reference
            A ``ClusterReference`` (or its ``.npz`` path): label by kNN transfer instead
            (:func:`~phenocoder_lib.clustering.transfer_labels`, also ``.obs[key_added + '_confidence']``).
        """
        from .clustering import ClusterReference, cluster_features, transfer_labels
        table = self._table(table_key)
        if reference is None:
            table.obs[key_added], ref = cluster_features(
                table, use_rep=use_rep, layer=layer, scale=scale, n_pcs=n_pcs, n_neighbors=n_neighbors,
                resolution=resolution, seed=self.seed, transfer_k=15 if transfer_k is None else transfer_k)
            return ref
        ref = ClusterReference.load(reference) if isinstance(reference, (str, Path)) else reference
        table.obs[key_added], table.obs[f"{key_added}_confidence"] = transfer_labels(ref, table, k=transfer_k)
        return ref

    @delegates_to("phenocoder_lib.spatial.driver.compute_spatial_stats")
    def spatialgraph_stats(self, cluster_key: str = "leiden", spatial_key: str = "spatial",
                           radii: float | Sequence[float] = (25, 50), table_key: str | None = None,
                           stats: str | Iterable[str] | None = None, *, chull_min_nds: int = 10,
                           chull_min_degree: int = 3, use_subunits: bool = False,
                           dim_subunit: float | Sequence[float] = (500, 500, 100), min_obs_per_subunit: int = 100,
                           max_obs_per_subunit: int | None = None, subunit_origin: Sequence[float] | None = None,
                           exact: bool = False, n_clustering_samples: int = 1000, layer: str | None = None,
                           progress: bool = True, n_jobs: int = 1, verbose: bool | None = None,
                           max_clusters: int = 500) -> Any:
        """Spatial graph statistics per sample (or subunit) of a clustered table, into ``self.adata``.

        Argument errors leave ``self.adata`` alone; a failed computation sets it to ``None``.

        Parameters
        ----------
        verbose
            Deprecated and ignored (``FutureWarning``): call :func:`phenocoder_lib.set_verbose_logging` instead.
        """
        args = {**_args(locals(), "verbose"), "table_key": self.table_key if table_key is None else table_key}
        from .spatial.driver import check_spatial_stats_args, compute_spatial_stats
        if verbose is not None:
            warnings.warn("spatialgraph_stats(verbose=...) is ignored and will be removed; call phenocoder_lib."
                          "set_verbose_logging() for progress logs.", FutureWarning, stacklevel=2)
        table = self._table(table_key)
        check_spatial_stats_args(table, **args, sample_key=self.sample_key)
        self.adata = None  # a failed computation leaves no stale result
        self.adata = compute_spatial_stats(table, **args, sample_key=self.sample_key, seed=self.seed)
        return self.adata

    @delegates_to("phenocoder_lib.embedding.spatialgraph_embedding")
    def spatialgraph_embedding(self, n_dim: int, scale: bool = True, variable_features: bool | int = False,
                               batch_correction: bool = False, batch_key: str | None = None,
                               confounder_key: str | Sequence[str] | None = None, n_neighbors: int = 15,
                               umap: bool = True, obs_keys: str | Sequence[str] | None = None,
                               neighbors: Literal["scanpy", "bbknn"] = "scanpy") -> Any:
        """Scale, batch-correct (optional), PCA, neighbours and UMAP of ``self.adata`` (idempotent).

        Batch, confounder and obs keys are looked up per sample in the table the statistics came from.
        """
        args = _args(locals())
        from .embedding import spatialgraph_embedding
        require(self.adata is not None, "self.adata is None: run spatialgraph_stats() first.")
        info = self.adata.uns.get("spatialgraph_stats", {})
        table = (getattr(self.sdata, "tables", None) or {}).get(info.get("table_key") or self.table_key)
        self.adata = spatialgraph_embedding(self.adata, **args, source_obs=None if table is None else table.obs,
                                            sample_key=info.get("sample_key") or self.sample_key, seed=self.seed)
        return self.adata
