"""Run configuration of every asset: the library's parameters, settable from the UI's launchpad.

This module is the one place that holds the default settings of every stage: a launch from the UI
with an empty config, the sensor's runs, the nightly schedule and ``phenocoder demo`` all take these
values unless the user sets others (the demo sets only what its command line chooses, plus the small
network of :data:`DEMO_MODEL`). Defaults are the library's defaults unless noted. Each class
documents which library call its fields go to; field names follow the workflow guide so that a run
can be relaunched from the UI with other settings and compared (the ``model`` settings are logged to
MLflow as parameters).

Defaults are the library's defaults unless noted. Fields carry pydantic bounds (radii and sizes
> 0, counts >= 1) and ``Literal`` choices: the launchpad offers the choices and refuses any other
value before a run is created; a value out of bounds stops the step before it reads any data, with
pydantic's message naming the field, the value and the bound. Each class documents which library call its
fields go to; field names follow the workflow guide so that a run can be relaunched from the UI
with other settings and compared (the ``model`` settings are logged to MLflow as parameters).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from dagster import Config
from pydantic import Field, PositiveFloat, PositiveInt, field_validator


class StatGroup(StrEnum):
    """Statistic groups of :func:`phenocoder_lib.spatial.compute_spatial_stats` (the launchpad offers these).

    An enum rather than ``Literal``: Dagster's config schema accepts ``Literal`` fields but not lists of them.
    """

    interactions = "interactions"
    centrality = "centrality"
    connectivity = "connectivity"
    moran_features = "moran_features"
    moran_clusters = "moran_clusters"
    chull = "chull"


class IngestConfig(Config):
    """:func:`phenocoder_lib.ingest.read_plate` for one well (partition ``<plate>_<well>``)."""

    plate_dir: str | None = Field(
        default=None,
        description="Plate export folder. Default: <landing>/<plate> where <plate> is the partition key's prefix.",
    )
    pixel_size_um: float | None = Field(default=None, gt=0, description="um per pixel (default: plate.json or 1.0).")
    z_step_um: float | None = Field(default=None, gt=0,
                                    description="um between z-slices (default: plate.json or 1.0).")
    table_scale: float | None = Field(default=None, gt=0, description="Table coordinate units per image pixel.")
    image_key: str = "IF"
    table_key: str = "nuclei_features"
    sample_key: str = "sample"
    image_dir: str = "imgs"
    label_dir: str = "labels"
    table_dir: str = "tables"
    image_pattern: str | None = Field(default=None,
                                      description="Regex with groups well, z, channel (default: CellVoyager).")
    label_pattern: str | None = Field(default=None, description="Regex with groups well, z.")
    table_pattern: str | None = Field(default=None, description="Regex with groups well, z.")
    label_column: str = "label"
    y_column: str = "centroid-0"
    x_column: str = "centroid-1"
    area_column: str = "area"
    feature_prefixes: list[str] = Field(default_factory=lambda: ["intensity"])
    preview: bool = Field(default=True, description="Render a thumbnail of the well into the asset metadata.")
    workers: int | None = Field(
        default=None, ge=1,
        description="Worker processes that ingest the wells of a run of several wells (a plate run, a backfill) "
                    "ahead of the step. Default: one per core where that pays (2 wells or more and at least "
                    "64 Mi image pixels in all), else none; 1: none. $PHENOCODER_MAX_WORKERS caps it. Memory: "
                    "one well per worker.",
    )

    def layout(self):  # -> PlateLayout
        """Return the :class:`phenocoder_lib.ingest.PlateLayout` these fields describe."""
        from phenocoder_lib.ingest import PlateLayout

        kwargs = dict(image_dir=self.image_dir, label_dir=self.label_dir, table_dir=self.table_dir,
                      label_column=self.label_column, y_column=self.y_column, x_column=self.x_column,
                      area_column=self.area_column, feature_prefixes=tuple(self.feature_prefixes))
        for name in ("image_pattern", "label_pattern", "table_pattern"):
            if getattr(self, name):
                kwargs[name] = getattr(self, name)
        return PlateLayout(**kwargs)


#: Patch size before any model exists; afterwards an empty ``patch_size`` means the current model's.
DEFAULT_PATCH_SIZE = [128, 128]


def resolve_patch_size(patch_size: list[int] | None, model_info: dict | None) -> list[int]:
    """``patch_size`` when given, else the patch size the current model was trained on, else the default."""
    if patch_size:
        return list(patch_size)  # as given: the library names a bad value
    trained = (model_info or {}).get("patches", {}).get("patch_size")
    return [int(v) for v in trained] if trained else list(DEFAULT_PATCH_SIZE)


class PatchesConfig(Config):
    """:func:`phenocoder_lib.patches.generate_dataset` (step 1 of the workflow guide) for one sample.

    The dataset is named after the sample; its normalization settings travel with it.
    """

    patch_size: list[PositiveInt] | None = Field(
        default=None,
        description="(height, width) in pixels, each >= 1. Default: the size the current model was trained on "
        "(new wells match it), or 128 x 128 before any model exists.",
    )

    @field_validator("patch_size")
    @classmethod
    def _two_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(value) != 2:
            raise ValueError(f"patch_size needs 2 values (height, width), got {value}; e.g. [64, 64], or leave it "
                             "empty for the current model's size")
        return value
    spatial_key_index: str = "spatial_index"
    scale: bool = True
    scale_percentile: float = Field(default=1.0, ge=0, lt=50)
    scale_per_sample: bool = True
    metadata_keys: list[str] = Field(default_factory=list, description="Extra .obs columns kept per patch.")
    n_patches: int | None = Field(default=None, ge=1, description="Seeded subset of patches (default: every object).")
    seed: int = 0


#: The small network ``phenocoder demo`` trains on its 32-px patches (training is a deliberate action;
#: every other stage of the demo runs with the defaults below).
DEMO_MODEL = {"n_latent_dim": 16, "n_dense_dim": 32, "conv_layers": [16, 32, 64]}


class ModelConfig(Config):
    """``Phenocoder.initialize_model`` + ``train`` (steps 2-3) on the patch datasets of ``samples``.

    ``input_shape`` is not a field: it is the datasets' patch size and channel count.
    """

    samples: list[str] = Field(
        default_factory=list,
        description="Partitions to train on (default: every sample with a patch dataset).",
    )
    n_latent_dim: int = Field(default=32, ge=1)
    n_dense_dim: int = Field(default=64, ge=1)
    conditions: list[str] = Field(default_factory=list,
                                  description="[] for a CVAE, e.g. ['dataset', 'z'] for a CondCVAE.")
    continuous_conditions: list[str] | None = Field(default=None, description="Default: 'z' and float columns.")
    dropout: float | None = Field(default=0.25, ge=0, lt=1)
    batch_size: int = Field(default=64, ge=1)
    n_workers: int = Field(default=1, ge=1)
    conv_layers: list[PositiveInt] = Field(default_factory=lambda: [8, 16, 32, 64, 128], min_length=1)
    beta: float = Field(default=0.01, ge=0)
    flip: bool = False
    shuffle: bool = True
    validation_fraction: float = Field(default=0.2, ge=0, lt=1)
    split_by: Literal["object", "sample"] = Field(default="object",
                                                  description="'object' (within each sample) or 'sample'.")
    memory_budget_gib: float = Field(default=1.0, gt=0, description="Raw patches up to this size are held in RAM; "
                                      "larger datasets stream through a chunk cache of this size.")
    n_epochs: int = Field(default=100, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    min_learning_rate: float = Field(default=1e-4, ge=0)
    factor_learning_rate: float = Field(default=0.2, gt=0, lt=1)
    learning_rate_patience: int = Field(default=3, ge=0)
    early_stopping_patience: int = Field(default=5, ge=0)
    plot: bool = True
    n_preview: int = Field(default=300, ge=0)
    plot_frac: float = Field(default=0.001, ge=0, le=1)
    seed: int = 0

    def model_kwargs(self, input_shape: list[int]) -> dict:
        """Arguments of ``Phenocoder.initialize_model`` (``input_shape`` comes from the datasets)."""
        return dict(n_latent_dim=self.n_latent_dim, n_dense_dim=self.n_dense_dim, conditions=list(self.conditions),
                    dropout=self.dropout, batch_size=self.batch_size, n_workers=self.n_workers,
                    input_shape=tuple(input_shape), conv_layers=tuple(self.conv_layers), beta=self.beta,
                    flip=self.flip, shuffle=self.shuffle, validation_fraction=self.validation_fraction,
                    split_by=self.split_by, continuous_conditions=self.continuous_conditions, seed=self.seed,
                    memory_budget_bytes=int(self.memory_budget_gib * 2**30))

    def train_kwargs(self) -> dict:
        """Arguments of ``Phenocoder.train``."""
        return dict(n_epochs=self.n_epochs, learning_rate=self.learning_rate, min_learning_rate=self.min_learning_rate,
                    factor_learning_rate=self.factor_learning_rate, learning_rate_patience=self.learning_rate_patience,
                    early_stopping_patience=self.early_stopping_patience, plot=self.plot, n_preview=self.n_preview,
                    plot_frac=self.plot_frac)


class LatentsConfig(Config):
    """``encode`` (step 4) for one sample with the current model (deterministic ``z_mean``)."""

    batch_size: int = Field(default=512, ge=1)
    spatial_message_passing_radius: float | None = Field(
        default=None, gt=0, description="Also average latents over neighbours within this radius (um); None: off."
    )
    spatial_key: str = "spatial"


class ClusterReferenceConfig(Config):
    """:func:`phenocoder_lib.clustering.cluster_features`: pooled Leiden over the reference samples."""

    samples: list[str] = Field(default_factory=list, description="Reference samples (default: all with latents).")
    use_message_passing: bool = Field(default=False, description="Cluster the message-passed layer instead of X.")
    scale: bool = True
    n_pcs: int = Field(default=50, ge=1)
    n_neighbors: int = Field(default=15, ge=1)
    resolution: float = Field(default=0.5, gt=0, description="Leiden resolution (the workflow guide's 0.5).")
    n_iterations: int = 2
    seed: int = 0
    max_reference: int | None = Field(default=200_000, ge=1)
    transfer_k: int = Field(default=15, ge=1)
    max_fit: int | None = Field(default=200_000, ge=1, description="Fit Leiden on at most this many objects (seeded "
                                "subsample); the others get the kNN vote. None: fit all.")
    knn: Literal["faiss", "pynndescent", "exact"] = Field(
        default="faiss", description="kNN graph backend: 'faiss' (HNSW), 'pynndescent' or 'exact'.")


class ClustersConfig(Config):
    """Per-sample labels: the pooled Leiden labels for reference samples, kNN transfer for new ones."""

    transfer_k: int | None = Field(default=None, ge=1, description="Voting neighbours (default: the reference's).")
    key_added: str = "leiden"


class GraphStatsConfig(Config):
    """:func:`phenocoder_lib.spatial.compute_spatial_stats` (step 5) for one sample."""

    radii: list[PositiveFloat] = Field(default_factory=lambda: [25.0, 50.0], min_length=1,
                               description="Graph radii (um), each > 0.")
    stats: list[StatGroup] | None = Field(default=None, description="Subset of the six groups (default: all).")
    spatial_key: str = "spatial"
    layer: str | None = None
    chull_min_nds: int = Field(default=10, ge=1)
    chull_min_degree: int = Field(default=3, ge=0)
    exact: bool = False
    n_clustering_samples: int = Field(default=1000, ge=1)
    use_subunits: bool = False
    dim_subunit: list[PositiveFloat] = Field(default_factory=lambda: [500.0, 500.0, 100.0], min_length=2, max_length=3,
                                     description="Subunit size (um) per axis, each > 0.")
    min_obs_per_subunit: int = Field(default=100, ge=1)
    max_obs_per_subunit: int | None = Field(default=None, ge=1)
    subunit_origin: list[float] | None = None
    seed: int = 0
    n_jobs: int = Field(default=1, ge=1)
    max_clusters: int = Field(default=500, ge=1, description="Refuse a clustering with more clusters (k x k columns).")


class EmbeddingConfig(Config):
    """:func:`phenocoder_lib.embedding.spatialgraph_embedding` (step 6) over every sample's statistics."""

    n_dim: int = Field(default=32, ge=1)
    scale: bool = True
    variable_features: bool = False
    n_variable_features: int | None = Field(
        default=None, ge=1, description="Keep this many variable features (overrides variable_features).")
    batch_correction: bool = False
    batch_key: str | None = None
    confounder_key: list[str] = Field(default_factory=list)
    n_neighbors: int = Field(default=15, ge=1)
    umap: bool = True
    obs_keys: list[str] = Field(default_factory=lambda: ["plate", "well"])
    seed: int = 0
