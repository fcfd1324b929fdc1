"""What each asset reports: its ``MaterializeResult`` drawn from the library result of its stage.

One function per asset (``<asset>_result``): it renders the preview picture into the staged folder
(call it inside ``storage.stage``), logs what the stage said, and returns the metadata (keys
explained in :mod:`phenocoder_assets.metadata_docs`), the asset checks and the data version.
No library work happens here: the numbers come from the result types of
:mod:`phenocoder_lib.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dagster import AssetCheckResult, AssetCheckSeverity, DataVersion, MaterializeResult, MetadataValue

from .assets._common import (
    EMBEDDING_FILE,
    LABELS_FILE,
    PREVIEW_FILE,
    SDATA_FILE,
    STATS_FILE,
    number,
    preview_metadata,
    round_sig,
    write_png,
)

#: Asset checks computed from the stage results.
CHECK_EVERY_OBJECT = "every_object_has_a_patch"
CHECK_GRAPH_STATS_COMPLETE = "graph_stats_complete"
CHECK_PROFILES_COMPLETE = "well_profiles_complete"


def seconds_metadata(seconds: dict[str, float]) -> dict[str, Any]:
    """``seconds_<phase>`` metadata of the timed phases of a stage.

    Parameters
    ----------
    seconds
        ``phase -> wall-clock seconds``.

    Returns
    -------
    dict
        One rounded float per phase.
    """
    return {f"seconds_{k}": number(v) for k, v in seconds.items()}


def anchor_text(channels: list[str], anchors: dict | None) -> str:
    """``"C01 0-214, C02 0-252"``: each channel's low and high normalization anchor (4 significant digits).

    Parameters
    ----------
    channels
        Channel names, in order.
    anchors
        ``{"low": [...], "high": [...]}``, or ``None`` when the patches were not scaled.

    Returns
    -------
    str
        The text shown on the asset page.
    """
    if not anchors:
        return "none (patches not scaled)"
    low, high = anchors.get("low", []), anchors.get("high", [])
    return ", ".join(f"{c} {round_sig(lo):g}-{round_sig(hi):g}" for c, lo, hi in zip(channels, low, high, strict=False))


def sdata_result(context: Any, well: Any, out: Path, final: str, data_version: DataVersion) -> MaterializeResult:
    """Result of ``sdata`` for one :class:`~phenocoder_assets.ingest_worker.IngestedFiles`.

    Parameters
    ----------
    context
        The asset's execution context (for the log).
    well
        The ingested well (its summary, timings and thumbnail).
    out, final
        The staged folder (the thumbnail is written there) and the asset folder's final address.
    data_version
        The well's data version.

    Returns
    -------
    MaterializeResult
        Metadata and data version.
    """
    summary = well.summary
    sample, shape, dims = summary["sample"], summary["image_shape"], summary["image_dims"]
    if well.png is not None:
        write_png(out / PREVIEW_FILE, well.png)
    context.log.info(f"{sample}: {summary['n_objects']} objects, image {tuple(shape)} -> {final}")
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(well.png, f"{sample}: max projection", final),
        "n_objects": MetadataValue.int(int(summary["n_objects"])),
        "n_features": MetadataValue.int(int(summary["n_features"])),
        "image_shape": MetadataValue.text(" x ".join(f"{d}={s}" for d, s in zip(dims, shape, strict=True))),
        "plate_dir": MetadataValue.path(summary["plate_dir"]),
        "source_digest": MetadataValue.text(str(summary["source_digest"])),
        "path": MetadataValue.path(f"{final}/{SDATA_FILE}"),
        **seconds_metadata(well.seconds),
    })


def patches_result(patches: Any, out: Path, final: str, data_version: DataVersion, *,
                   subset: bool) -> MaterializeResult:
    """Result of ``patches`` for one :class:`~phenocoder_lib.pipeline.WellPatches`.

    Parameters
    ----------
    patches
        The well's patch dataset.
    out, final
        The staged folder (the montage is written there) and the asset folder's final address.
    data_version
        The dataset's data version.
    subset
        Whether only a subset of the objects was asked for: a missing patch is then a warning, not an error.

    Returns
    -------
    MaterializeResult
        Metadata, the :data:`CHECK_EVERY_OBJECT` check and the data version.
    """
    import numpy as np

    from .previews import patch_montage

    ds, n, png = patches.dataset, patches.n_patches, None
    settings = ds.settings
    if n:
        png = patch_montage(ds.read(ds.name, rows=np.arange(min(16, n))), title=f"{ds.name}: first patches")
        write_png(out / PREVIEW_FILE, png)
    return MaterializeResult(
        data_version=data_version,
        metadata={
            **preview_metadata(png, f"{ds.name}: patches", final),
            "n_patches": MetadataValue.int(n),
            "n_padded": MetadataValue.int(int(settings["n_padded"])),
            "patch_size": MetadataValue.text("x".join(map(str, settings["patch_size"]))),
            "channels": MetadataValue.text(", ".join(settings["channels"])),
            "anchors": MetadataValue.text(anchor_text(settings["channels"], patches.anchors)),
            "path": MetadataValue.path(final),
            **seconds_metadata(patches.seconds),
        },
        check_results=[AssetCheckResult(
            check_name=CHECK_EVERY_OBJECT,
            passed=not patches.missing,
            severity=AssetCheckSeverity.WARN if subset else AssetCheckSeverity.ERROR,
            metadata={"n_objects": patches.n_objects, "n_patches": n, "n_missing": len(patches.missing),
                      "missing_examples": MetadataValue.text(", ".join(patches.missing[:10]))},
        )],
    )


def cluster_reference_result(built: Any, out: Path, final: str, data_version: DataVersion) -> MaterializeResult:
    """Result of ``cluster_reference`` for one :class:`~phenocoder_lib.pipeline.ReferenceClustering`.

    Parameters
    ----------
    built
        The reference clustering.
    out, final
        The staged folder (the scatter plot is written there) and the asset folder's final address.
    data_version
        The reference's data version.

    Returns
    -------
    MaterializeResult
        Metadata and data version.
    """
    from .previews import scatter, two_columns

    ref, info = built.reference, built.info
    png = scatter(two_columns(ref.ref_embedding), [ref.categories[i] for i in ref.ref_labels],
                  title="reference objects (PC1, PC2) by cluster", xlabel="PC1", ylabel="PC2", size=3)
    write_png(out / PREVIEW_FILE, png)
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, "cluster reference", final),
        "n_clusters": MetadataValue.int(len(ref.categories)),
        "n_objects": MetadataValue.int(int(info["n_objects"])),
        "samples": MetadataValue.json(list(info["samples"])),
        "model": MetadataValue.text(info["model"]),
        "reference_id": MetadataValue.text(info["id"]),
        "cluster_sizes": MetadataValue.json(built.cluster_sizes),
        "path": MetadataValue.path(final),
        **seconds_metadata(built.seconds),
    })


def clusters_result(labels: Any, sample: str, out: Path, final: str, data_version: DataVersion) -> MaterializeResult:
    """Result of ``clusters`` for one :class:`~phenocoder_lib.pipeline.WellLabels`.

    Parameters
    ----------
    labels
        The well's labels.
    sample
        The well's sample name.
    out, final
        The staged folder (the map of the well is written there) and the asset folder's final address.
    data_version
        The labels' data version.

    Returns
    -------
    MaterializeResult
        Metadata and data version.
    """
    import numpy as np

    from .previews import scatter

    png = scatter(labels.coords, np.asarray(labels.labels[labels.key]), title=f"{sample}: clusters ({labels.source})",
                  xlabel="x (um)", ylabel="y (um)", invert_y=True, size=5)
    write_png(out / PREVIEW_FILE, png)
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, f"{sample}: clusters", final),
        "n_objects": MetadataValue.int(len(labels.labels)),
        "source": MetadataValue.text(labels.source),
        "reference_id": MetadataValue.text(labels.reference_id),
        "mean_confidence": number(labels.mean_confidence),
        "cluster_sizes": MetadataValue.json(labels.cluster_sizes),
        "path": MetadataValue.path(f"{final}/{LABELS_FILE}"),
        **seconds_metadata(labels.seconds),
    })


def graph_stats_result(stats: Any, sample: str, out: Path, final: str, data_version: DataVersion) -> MaterializeResult:
    """Result of ``graph_stats`` for one :class:`~phenocoder_lib.pipeline.WellGraphStats`.

    Parameters
    ----------
    stats
        The well's statistics.
    sample
        The well's sample name.
    out, final
        The staged folder (the enrichment heatmap is written there) and the asset folder's final address.
    data_version
        The statistics' data version.

    Returns
    -------
    MaterializeResult
        Metadata, the :data:`CHECK_GRAPH_STATS_COMPLETE` check and the data version.
    """
    from phenocoder_lib.spatial.stats import format_radius

    from .previews import heatmap

    png = None
    if stats.interactions is not None:
        png = heatmap(stats.interactions, stats.categories, colorbar="enrichment z-score",
                      title=f"{sample}: neighbours within {format_radius(stats.radius)} um",
                      xlabel="neighbour cluster", ylabel="cluster")
        write_png(out / PREVIEW_FILE, png)
    result = stats.stats
    return MaterializeResult(
        data_version=data_version,
        metadata={
            **preview_metadata(png, f"{sample}: neighbourhood enrichment", final),
            "n_rows": MetadataValue.int(int(result.n_obs)),
            "n_features": MetadataValue.int(int(result.n_vars)),
            "n_skipped": MetadataValue.int(stats.n_skipped),
            "n_nan_values": MetadataValue.int(stats.n_nan),
            "path": MetadataValue.path(f"{final}/{STATS_FILE}"),
            **seconds_metadata(stats.seconds),
        },
        check_results=[AssetCheckResult(
            check_name=CHECK_GRAPH_STATS_COMPLETE, passed=stats.complete,
            metadata={"n_expected_features": len(stats.expected_features),
                      "n_missing_features": len(stats.missing_features),
                      "skipped_reasons": MetadataValue.text("; ".join(stats.skipped_reasons[:5])),
                      "n_nan_values": stats.n_nan},
        )],
    )


def embedding_result(context: Any, embedded: Any, out: Path, final: str,
                     data_version: DataVersion) -> MaterializeResult:
    """Result of ``embedding`` for one :class:`~phenocoder_lib.pipeline.WellEmbedding`.

    Parameters
    ----------
    context
        The asset's execution context (for the log and the registered partitions).
    embedded
        The embedding of the wells.
    out, final
        The staged folder (the scatter plot of the wells is written there) and the asset folder's final address.
    data_version
        The embedding's data version.

    Returns
    -------
    MaterializeResult
        Metadata (``planted_truth/*`` on synthetic plates) and data version.
    """
    import numpy as np

    from .partitions import SAMPLES
    from .previews import scatter, two_columns

    emb, axis = embedded.embedding, embedded.key[2:].upper()
    if len(embedded.reference_ids) > 1:
        context.log.warning(f"graph_stats were computed with different cluster references {embedded.reference_ids}; "
                            "their columns may not be comparable. Rematerialize 'clusters' and 'graph_stats' for all "
                            "samples.")
    for message in embedded.warnings:
        context.log.warning(message)
    truth = embedded.planted_truth
    if truth is not None:
        context.log.info(f"planted truth: {truth}")
    names = [str(s) for s in emb.obs_names]
    png = scatter(two_columns(np.asarray(emb.obsm[embedded.key])), embedded.colours,
                  title=f"{emb.n_obs} wells ({axis}), coloured by {embedded.legend}", xlabel=f"{axis}1",
                  ylabel=f"{axis}2", size=30, annotate=names)
    write_png(out / PREVIEW_FILE, png)
    known = set(context.instance.get_dynamic_partitions(SAMPLES))
    return MaterializeResult(data_version=data_version, metadata={
        **preview_metadata(png, "well embedding", final),
        **{f"planted_truth/{k}": number(float(v)) for k, v in (truth or {}).items()},
        "n_samples": MetadataValue.int(int(emb.n_obs)),
        "n_features": MetadataValue.int(int(emb.n_vars)),
        "n_components": MetadataValue.int(int(emb.obsm["X_pca"].shape[1])),
        "samples": MetadataValue.json(list(embedded.samples)),
        "partitions_without_graph_stats": MetadataValue.json(sorted(known - set(embedded.samples))),
        "path": MetadataValue.path(f"{final}/{EMBEDDING_FILE}"),
        **seconds_metadata(embedded.seconds),
    })


def well_profiles_result(context: Any, profiled: Any, final: str, data_version: DataVersion) -> MaterializeResult:
    """Result of ``well_profiles`` for one :class:`~phenocoder_lib.pipeline.ProfiledWells`.

    Parameters
    ----------
    context
        The asset's execution context (for the log).
    profiled
        The profiles of the wells.
    final
        The asset folder's final address.
    data_version
        The profiles' data version.

    Returns
    -------
    MaterializeResult
        Metadata (``profiling/*`` when scored), the :data:`CHECK_PROFILES_COMPLETE` check and the data version.
    """
    for message in profiled.messages:
        log = context.log.warning if message.startswith("profile scoring skipped") else context.log.info
        log(message)
    scores = profiled.scores
    metadata = {
        "n_samples": MetadataValue.int(len(profiled.samples)),
        "representations": MetadataValue.json({k: int(v.shape[1]) for k, v in profiled.frames.items()}),
        "scored": MetadataValue.bool(scores is not None),
        "path": MetadataValue.path(final),
        **seconds_metadata(profiled.seconds),
    }
    if scores is not None:
        metadata["profiling/n_wells_with_layout"] = MetadataValue.int(int(scores["n_wells_with_layout"]))
        metadata |= {f"profiling/{k}": number(v) for k, v in profiled.metrics().items()}
    missing, finite = profiled.missing, profiled.finite
    return MaterializeResult(data_version=data_version, metadata=metadata, check_results=[AssetCheckResult(
        check_name=CHECK_PROFILES_COMPLETE, passed=not missing and finite,
        metadata={"n_missing": len(missing), "all_finite": finite})])
