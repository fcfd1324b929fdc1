"""``well_profiles`` (all samples): per-well profiles and, when a plate layout is present, their retrieval mAP."""

from dagster import (
    AllPartitionMapping,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    asset,
)
from pydantic import Field

from ..metadata import CHECK_PROFILES_COMPLETE
from ..metadata_docs import describe
from ..resources import PhenocoderStorage
from ._common import (
    LATENTS_FILE,
    STATS_FILE,
    logical_version,
    read_version,
    sdata_summaries,
    settings_of,
    write_version,
)

CHECK_COMPLETE = CHECK_PROFILES_COMPLETE
CODE_VERSION = "2"


class ProfilesConfig(Config):
    """Settings of :func:`phenocoder_lib.profiles.build_profiles` and ``retrieval.evaluate_profiles``."""

    corr_threshold: float = Field(default=0.9, gt=0, le=1,
                                  description="Drop one of two features correlated above this.")
    sphere: bool = Field(default=True, description="ZCA sphering of every representation on the control wells "
                         "after feature selection (the graph_stats block is always sphered).")
    null_size: int = Field(default=10000, ge=1, description="Permutations of the mAP p-values.")
    seed: int = Field(default=0, description="Seed of the permutation nulls.")


@asset(
    deps=[AssetDep("latents", partition_mapping=AllPartitionMapping()),
          AssetDep("graph_stats", partition_mapping=AllPartitionMapping())],
    group_name="cross_sample",
    kinds={"pandas", "copairs"},
    code_version=CODE_VERSION,
    check_specs=[AssetCheckSpec(CHECK_COMPLETE, asset="well_profiles",
                                description="Every sample with latents has a finite latent profile.")],
    description=describe("well_profiles", "Per-well profiles (median latent, median message-passed latent, graph "
                         "statistics, arrangement features) of every sample, "
                         "`<root>/well_profiles/_/<representation>.parquet`. When a "
                         "`layout.csv` (well, treatment, dose, control, mechanism) sits beside a plate export, the "
                         "profiles are normalized per plate against its controls and scored (retrieval mAP, "
                         "copairs): metadata `profiling/<representation>/<metric>`. Without a layout nothing is "
                         "claimed."),
)
def well_profiles(context: AssetExecutionContext, config: ProfilesConfig,
                  storage: PhenocoderStorage) -> MaterializeResult:
    """:func:`phenocoder_lib.profiles.aggregate_table` of every sample's latents, plus its graph statistics.

    Scored by :func:`phenocoder_lib.pipeline.score_profiles` when a plate folder holds a layout; a failure
    there is logged, never raised (the profiles are the asset, their scores an extra).
    """
    from phenocoder_lib.pipeline import profile_wells

    from ..metadata import well_profiles_result

    samples = storage.partitions("latents")
    if len(samples) < 2:
        raise ValueError(f"well profiles need the latents of at least 2 samples, found {samples}; materialize "
                         "'latents' for more samples first.")
    stats = storage.partitions("graph_stats")
    # computed from every sample's latents and graph statistics (and the layouts, digested below)
    inputs = {f"latents/{s}": read_version(storage, "latents", s) for s in samples}
    inputs |= {f"graph_stats/{s}": read_version(storage, "graph_stats", s) for s in stats}
    with storage.stage("well_profiles") as out:
        profiled = profile_wells({s: storage.local_path("latents", s) / LATENTS_FILE for s in samples},
                                 {s: storage.local_path("graph_stats", s) / STATS_FILE for s in stats},
                                 sdata_summaries(storage, samples), out, **settings_of(config))
        version = logical_version(CODE_VERSION, settings_of(config), {**inputs, **profiled.layout_digests})
        data_version = write_version(out, version, inputs)
    return well_profiles_result(context, profiled, storage.url("well_profiles"), data_version)
