"""Profile validation on a synthetic multi-plate screen: retrieval mAP per representation (``validate --json``).

:func:`run_screen_validation` writes a fresh seeded screen (:func:`phenocoder_lib.synthetic.make_synthetic_screen`:
plates with plate effects, controls on every plate, replicates, two doses, morphology / subtle / spatial
phenotypes), runs the pipeline once on all plates (one CVAE, encoding with message passing, Leiden on the
latents, spatial graph statistics per well), builds well profiles of six representations and scores each
with :func:`phenocoder_lib.retrieval.evaluate_profiles`:

``latents``
    median CVAE latent of the well's nuclei;
``latents_message_passing``
    median of the message-passed latents (each nucleus averaged with its neighbours);
``graph_stats``
    the well's spatial graph statistics (cluster interactions, Moran's I of the clusters) and arrangement
    features (neighbour-type composition, co-occurrence, radial statistics of control-fitted cell types);
``combined``
    ``latents`` and ``graph_stats`` side by side, each block weighted equally;
``regionprops``
    the export's own measurement table (per-channel mean intensity, area, eccentricity, axis lengths): the
    feature-table baseline;
``cellprofiler``
    CellProfiler intensity, texture, granularity and size/shape from the same images and masks
    (:mod:`phenocoder_lib.cellprofiler`).

Every representation is aggregated (median per well) and normalized the same way
(:func:`phenocoder_lib.profiles.build_profiles`: mad_robustize per plate against its controls, variance and
correlation feature selection, ZCA sphering on the controls) by :func:`build_representations`, the path the
``well_profiles`` asset shares; ``graph_stats`` also holds the arrangement features of
:mod:`phenocoder_lib.spatial.neighbourhood`. :func:`check_targets` states the targets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .profiles import (
    WellProfiles,
    aggregate_by_cluster,
    aggregate_table,
    aggregate_wells,
    attach_layout,
    build_profiles,
    check_layout,
    combine_profiles,
)
from .retrieval import evaluate_profiles

logger = logging.getLogger(__name__)

#: Representations, in report order.
REPRESENTATIONS = ("latents", "latents_message_passing", "graph_stats", "combined", "regionprops", "cellprofiler")
#: Measurement-table columns of the regionprops baseline besides the intensities (those present are used).
REGIONPROPS_MORPHOLOGY = ("area", "eccentricity", "major_axis_length", "minor_axis_length")
#: Spatial-statistics groups of the ``graph_stats`` profile: who sits next to whom (cluster interaction counts
#: and enrichment, Moran's I of each cluster). Chosen on seed 0 (docs/profiling.md): with every group the noise of
#: the others (connectivity spread, convex hulls, Moran's I of each latent) halves the retrieval.
GRAPH_STAT_GROUPS = ("interactions", "moran_clusters")
#: Raw per-well frame of the arrangement features (:func:`phenocoder_lib.spatial.neighbourhood.well_arrangement`),
#: joined to the ``graph_stats`` block by :func:`build_representations`.
ARRANGEMENT = "arrangement"
#: Summary metrics per representation.
METRICS = ("map_activity", "map_consistency", "fraction_retrieved_activity", "percent_replicating")


def _sample_frame(obs: pd.DataFrame, sample_key: str) -> pd.DataFrame:
    return obs[[sample_key, "plate", "well"]].astype(str).drop_duplicates(sample_key).rename(
        columns={sample_key: "sample"})


def object_arrangement(
    values: np.ndarray,
    coords: np.ndarray,
    samples: Sequence[str] | np.ndarray,
    layout: pd.DataFrame | None,
    sample_info: pd.DataFrame,
    *,
    n_types: int = 3,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-well arrangement features with cell types fitted on the control wells' objects.

    Parameters
    ----------
    values
        (n_objects, n_features) object latents (the types are k-means clusters of them).
    coords
        (n_objects, 2 or 3) object positions (``.obsm['spatial']``).
    samples
        (n_objects,) sample of each object.
    layout
        Checked layout (``plate`` optional); its control wells fit the types. ``None``: fit on every well.
    sample_info
        ``sample``, ``plate``, ``well`` of each sample (to find the control samples).
    n_types
        Number of cell types.
    seed
        Seed of the k-means fit.

    Returns
    -------
    One row per sample, one column per feature (:func:`phenocoder_lib.spatial.neighbourhood.well_arrangement`).

    """
    from .spatial.neighbourhood import well_arrangement

    controls = None
    if layout is not None:
        keys = ["plate", "well"] if "plate" in layout.columns else ["well"]
        ctrl = layout.loc[layout["control"].astype(bool), keys].astype(str)
        info = sample_info[["sample", "plate", "well"]].astype(str)
        controls = info.merge(ctrl, on=keys)["sample"].tolist() or None
    return well_arrangement(values, coords, samples, fit_samples=controls, n_types=n_types, seed=seed)


def build_representations(
    raw: dict[str, pd.DataFrame],
    samples: pd.DataFrame,
    layout: pd.DataFrame,
    *,
    corr_threshold: float = 0.9,
    sphere: bool = True,
    sphere_spatial: bool = True,
    graph_stat_groups: Sequence[str] | None = GRAPH_STAT_GROUPS,
) -> dict[str, WellProfiles]:
    """Normalized profiles of the pipeline's representations, and their combination; one path for all callers.

    ``phenocoder validate --json`` (:func:`screen_profiles`) and the ``well_profiles`` asset
    (:func:`phenocoder_lib.pipeline.score_profiles`) both build their profiles here. The ``graph_stats`` block
    is the spatial statistics restricted to ``graph_stat_groups`` joined with the :data:`ARRANGEMENT`
    features when present; it is sphered on the controls (ZCA-cor) when ``sphere_spatial``: its features are
    many views of one arrangement, strongly correlated among the controls, and whitening them is what lets a
    half-strength arrangement stand out (docs/profiling.md).

    Parameters
    ----------
    raw
        Representation -> raw per-well frame (index ``sample``; ``n_objects`` is dropped): ``latents``,
        ``latents_message_passing``, ``graph_stats``, :data:`ARRANGEMENT` (those present).
    samples
        ``sample``, ``plate``, ``well`` of every well.
    layout
        ``well, treatment, dose, control[, mechanism][, plate]``; a ``kind`` column is ignored.
    corr_threshold
        Correlation threshold of the feature selection.
    sphere
        Sphere every representation on the controls.
    sphere_spatial
        Sphere the ``graph_stats`` block (also when ``sphere`` is false).
    graph_stat_groups
        Spatial-statistics groups kept from ``raw['graph_stats']`` (``None``: all).

    Returns
    -------
    Representation -> :class:`~phenocoder_lib.profiles.WellProfiles`; ``combined`` (latents + graph_stats)
    when both exist.

    """
    layout = layout.drop(columns=[c for c in ("kind",) if c in layout.columns])

    def build(frame: pd.DataFrame, name: str, sphered: bool) -> WellProfiles:
        feats = frame.drop(columns="n_objects", errors="ignore")
        return build_profiles(attach_layout(feats, samples, layout), list(feats.columns), representation=name,
                              corr_threshold=corr_threshold, sphere=sphered)

    out: dict[str, WellProfiles] = {}
    for name in ("latents", "latents_message_passing"):
        if name in raw:
            out[name] = build(raw[name], name, sphere)
    spatial = []
    if "graph_stats" in raw:
        stats = raw["graph_stats"].drop(columns="n_objects", errors="ignore")
        if graph_stat_groups:
            stats = stats[[c for c in stats.columns if any(f"_stat:{g}_" in c for g in graph_stat_groups)]]
        spatial.append(stats)
    if ARRANGEMENT in raw:
        spatial.append(raw[ARRANGEMENT])
    if spatial:
        out["graph_stats"] = build(pd.concat(spatial, axis=1, join="outer"), "graph_stats", sphere or sphere_spatial)
    if "latents" in out and "graph_stats" in out:
        out["combined"] = combine_profiles({"latents": out["latents"], "graph_stats": out["graph_stats"]})
    return out


def screen_profiles(
    table: Any,
    features: Any,
    graph_stats: Any,
    cellprofiler: pd.DataFrame | None,
    layout: pd.DataFrame,
    *,
    sample_key: str = "sample",
    layer: str = "spatial_message_passing",
    sphere: bool = True,
    method: str = "median",
    per_cluster: str | None = None,
    graph_stat_groups: Sequence[str] | None = GRAPH_STAT_GROUPS,
    arrangement: bool = True,
    sphere_spatial: bool = True,
    seed: int = 0,
) -> dict[str, WellProfiles]:
    """Normalized well profiles of every representation.

    Parameters
    ----------
    table
        Encoded objects (``.X`` latents, ``.layers[layer]`` message-passed latents, ``.obs[sample_key]``).
    features
        The ingested measurement table (``.X`` mean intensities, morphology in ``.obs``).
    graph_stats
        One row per sample (``obs_names`` = sample) of spatial statistics (NaN-free columns are used).
    cellprofiler
        Object-level CellProfiler features with a ``sample`` column (:func:`phenocoder_lib.cellprofiler.
        measure_plate`), or ``None`` to leave that baseline out.
    layout
        ``plate, well, treatment, dose, control, mechanism`` of every well.
    sample_key, layer
        Sample column and message-passing layer.
    sphere
        ZCA sphering on the controls after selection.
    method
        Aggregation of object-level values per well (``median``, the field's default, or ``mean``).
    per_cluster
        Also aggregate the latents per cluster of this ``table.obs`` column (:func:`aggregate_by_cluster`).
    graph_stat_groups
        Spatial-statistics groups kept in the ``graph_stats`` profile (``None``: all).
    arrangement
        Add the arrangement features (:func:`object_arrangement`: cell types fitted on the control wells'
        latents, neighbourhood composition, co-occurrence, radial statistics) to the ``graph_stats`` block.
    sphere_spatial
        Sphere the ``graph_stats`` block on the controls (:func:`build_representations`).
    seed
        Seed of the cell-type fit.

    Returns
    -------
    Representation name -> :class:`~phenocoder_lib.profiles.WellProfiles`, in :data:`REPRESENTATIONS` order
    (``cellprofiler`` only when ``cellprofiler`` is given).

    """
    from .keys import SPATIAL_KEY

    samples = _sample_frame(table.obs, sample_key)
    layout = layout.drop(columns=[c for c in ("kind",) if c in layout.columns])

    def build(raw: pd.DataFrame, name: str) -> WellProfiles:
        frame = attach_layout(raw, samples, layout)
        return build_profiles(frame, [c for c in raw.columns if c != "n_objects"], representation=name,
                              sphere=sphere)

    lat = aggregate_table(table, sample_key=sample_key, prefix="latent:", method=method)
    if per_cluster:
        lat = lat.join(aggregate_by_cluster(table, sample_key=sample_key, cluster_key=per_cluster, method=method,
                                            prefix="latent:"))
    raw = {"latents": lat,
           "latents_message_passing": aggregate_table(table, layer=layer, sample_key=sample_key, prefix="mp:",
                                                      method=method),
           "graph_stats": pd.DataFrame(np.asarray(graph_stats.X, dtype=np.float64),
                                       index=graph_stats.obs_names.astype(str),
                                       columns=[str(v) for v in graph_stats.var_names])}
    if arrangement:
        x = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
        raw[ARRANGEMENT] = object_arrangement(x, np.asarray(table.obsm[SPATIAL_KEY]),
                                              table.obs[sample_key].astype(str).to_numpy(), check_layout(layout),
                                              samples, seed=seed)
    out = build_representations(raw, samples, layout, sphere=sphere, sphere_spatial=sphere_spatial,
                                graph_stat_groups=graph_stat_groups)
    morph = [c for c in REGIONPROPS_MORPHOLOGY if c in features.obs.columns]
    values = np.hstack([np.asarray(features.X, dtype=np.float64), features.obs[morph].to_numpy(np.float64)])
    names = [str(v) for v in features.var_names] + morph
    out["regionprops"] = build(aggregate_wells(values, features.obs[sample_key].astype(str).to_numpy(),
                                               feature_names=names, method=method), "regionprops")
    if cellprofiler is not None:
        cols = [c for c in cellprofiler.columns if c not in ("sample", "plate", "well", "label")]
        cp = aggregate_wells(cellprofiler[cols].to_numpy(np.float64), cellprofiler["sample"].astype(str).to_numpy(),
                             feature_names=cols, method=method)
        out["cellprofiler"] = build(cp.loc[:, cp.notna().all()], "cellprofiler")
    return out


def score_profiles(profiles: dict[str, WellProfiles], layout: pd.DataFrame, *, null_size: int = 10000,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_profiles` of every representation, with subsets per phenotype kind (``layout['kind']``).

    Parameters
    ----------
    profiles
        Representation name -> normalized well profiles (:func:`screen_profiles`).
    layout
        The screen layout; with a ``kind`` column, every kind's treatments form a subset that is also scored
        on its own.
    null_size, seed
        Permutations of the mAP p-values and their seed.

    Returns
    -------
    Representation name -> the dict of :func:`~phenocoder_lib.retrieval.evaluate_profiles` (with ``subsets``
    per kind when the layout has ``kind``).

    """
    subsets = None
    layout = check_layout(layout)
    if "kind" in layout.columns:
        treated = layout[~layout["control"].astype(bool)]
        subsets = {str(k): sorted(treated.loc[treated["kind"] == k, "treatment"].astype(str).unique())
                   for k in sorted(treated["kind"].astype(str).unique())}
    return {name: evaluate_profiles(p, null_size=null_size, seed=seed, subsets=subsets)
            for name, p in profiles.items()}


def check_targets(scores: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The profile targets: one entry per target with the values compared and whether it is met.

    - ``combined`` has the highest ``map_activity`` of all representations;
    - on the spatial-arrangement treatments, ``graph_stats`` retrieves >= 0.9 of the treatment-doses
      (q < 0.05) while both baselines stay near chance (retrieve <= 0.2, i.e. at most one false hit in five);
    - on the morphology treatments, ``latents`` ``map_activity`` >= ``cellprofiler``'s (within 0.02).

    Parameters
    ----------
    scores
        Representation name -> metrics (:func:`score_profiles`); the subset targets read ``subsets["spatial"]``
        and ``subsets["morphology"]`` (NaN, hence not met, when absent).

    Returns
    -------
    Three dicts, one per target: ``target`` (its wording), the values compared and ``met`` (bool).

    """
    out = []
    best = max(scores, key=lambda k: scores[k]["map_activity"])
    out.append({"target": "combined has the highest map_activity", "best": best,
                "values": {k: round(v["map_activity"], 4) for k, v in scores.items()}, "met": best == "combined"})

    def sub(rep: str, kind: str, metric: str) -> float:
        return float(scores.get(rep, {}).get("subsets", {}).get(kind, {}).get(metric, float("nan")))

    gs = sub("graph_stats", "spatial", "fraction_retrieved_activity")
    base = {b: sub(b, "spatial", "fraction_retrieved_activity") for b in ("regionprops", "cellprofiler")}
    out.append({"target": "spatial: graph_stats retrieves >= 0.9, baselines <= 0.2", "graph_stats": gs,
                "baselines": base, "met": bool(gs >= 0.9 and all(v <= 0.2 for v in base.values()))})
    lat, cp = sub("latents", "morphology", "map_activity"), sub("cellprofiler", "morphology", "map_activity")
    out.append({"target": "morphology: latents map_activity >= cellprofiler (within 0.02)", "latents": lat,
                "cellprofiler": cp, "met": bool(lat >= cp - 0.02)})
    return out


def run_screen_validation(
    out: str | Path,
    *,
    seed: int = 0,
    n_plates: int = 3,
    nuclei_per_well: int = 270,
    replicates: int = 2,
    epochs: int = 25,
    patch_size: int = 16,
    conv_layers: Sequence[int] = (32, 64),
    n_latent_dim: int = 32,
    radius: float = 30.0,
    resolution: float = 0.02,
    treatments: Sequence[str] | None = None,
    cellprofiler: bool = True,
    null_size: int = 10000,
) -> dict[str, Any]:
    """Write a screen, run the pipeline on it and score every representation.

    Parameters
    ----------
    out
        Working folder; the screen and the pipeline's intermediates go to
        ``out/screen_s{seed}_n{nuclei_per_well}_{digest of the settings}`` and are reused by a rerun with the
        same settings (which then only rescores).
    seed
        Seed of the screen, the model, the clustering and the permutation nulls.
    n_plates, nuclei_per_well, replicates, treatments
        Screen design (:func:`phenocoder_lib.synthetic.make_synthetic_screen`; the field grows with the nuclei
        at a fixed density). 270 nuclei per well: with 90, even the true cell types retrieve only 0.72 of
        the spatial treatment-doses (``benchmarks/spatial_power.py``), with 270 all of them.
    epochs, patch_size, conv_layers, n_latent_dim
        CVAE training (plate-wide intensity anchors: per-well anchors would undo the planted intensity
        differences between wells). 32 latent dimensions and 25 epochs (the single plate's 16 and 15 gave
        morphology mAP 0.92 instead of 0.95 and a combined profile below CellProfiler on seed 0).
    radius
        Message-passing and graph radius in um (the first of the two graph radii; the second is twice it).
    resolution
        Leiden resolution of the latent clusters that the graph statistics count.
    cellprofiler
        Measure the CellProfiler baseline (about a second per well).
    null_size
        Permutations of the mAP p-values.

    Returns
    -------
    A JSON-serializable document: ``representations`` (metrics per representation, with ``subsets`` per
    phenotype kind), ``targets``, ``settings`` and ``timings_s``.

    """
    import spatialdata as sd

    from .ingest import read_plate
    from .synthetic import make_synthetic_screen

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    settings = {"n_plates": n_plates, "nuclei_per_well": nuclei_per_well, "replicates": replicates,
                "treatments": treatments, "epochs": epochs, "patch_size": patch_size, "conv_layers": conv_layers,
                "n_latent_dim": n_latent_dim, "radius": float(radius), "resolution": float(resolution)}
    work = Path(out) / work_folder_name(seed, **settings)
    screen_dir = work / "screen"
    if not (screen_dir / "screen_layout.csv").is_file():
        make_synthetic_screen(screen_dir, n_plates=n_plates, nuclei_per_well=nuclei_per_well, replicates=replicates,
                              treatments=tuple(treatments) if treatments else None, seed=seed)
    layout = check_layout(pd.read_csv(screen_dir / "screen_layout.csv", dtype={"well": str, "plate": str,
                                                                               "mechanism": str},
                                      keep_default_na=False), argument="screen_layout.csv")
    plates = sorted(p for p in screen_dir.iterdir() if p.is_dir())
    sdata = sd.concatenate([read_plate(p) for p in plates], concatenate_tables=True)
    timings["screen_and_ingest"] = time.perf_counter() - t0

    # the expensive intermediates are kept in the working folder, so a rerun only rescores
    cache = work / "intermediates"
    features = sdata.tables["nuclei_features"]
    if (cache / "complete.json").is_file():
        import anndata as ad

        table = ad.read_h5ad(cache / "latents.h5ad")
        stats = ad.read_h5ad(cache / "graph_stats.h5ad")
        cp = pd.read_parquet(cache / "cellprofiler.parquet") if (cache / "cellprofiler.parquet").is_file() else None
        n_clusters = int(table.obs["leiden"].nunique())
    else:
        table, stats, n_clusters = _run_pipeline(sdata, work, seed=seed, patch_size=patch_size,
                                                 conv_layers=conv_layers, n_latent_dim=n_latent_dim, epochs=epochs,
                                                 radius=radius, resolution=resolution, timings=timings)
        cp = None
        cache.mkdir(parents=True, exist_ok=True)
        table.write_h5ad(cache / "latents.h5ad")
        stats.write_h5ad(cache / "graph_stats.h5ad")
        (cache / "complete.json").write_text("{}\n")
    if cellprofiler and cp is None:  # a new run, or a cached one that ran with cellprofiler=False: measured once
        from .cellprofiler import measure_plate

        t = time.perf_counter()
        cp = pd.concat([measure_plate(p) for p in plates], ignore_index=True)
        timings["cellprofiler"] = time.perf_counter() - t
        cp.to_parquet(cache / "cellprofiler.parquet")
    if not cellprofiler:
        cp = None
    ari = _cluster_ari(table, screen_dir)

    t = time.perf_counter()
    profiles = screen_profiles(table, features, stats, cp, layout, seed=seed)
    scores = score_profiles(profiles, layout, null_size=null_size, seed=seed)
    timings["profiles_and_scores"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    for name, p in profiles.items():
        scores[name]["n_wells"] = p.n_wells
    return {
        "seed": seed,
        "representations": scores,
        "targets": check_targets(scores),
        "settings": {"n_plates": n_plates, "wells": int(len(layout)), "nuclei_per_well": nuclei_per_well,
                     "replicates_per_plate": replicates, "epochs": epochs, "patch_size": patch_size,
                     "radius_um": radius, "leiden_resolution": resolution, "n_clusters": n_clusters,
                     "cluster_vs_cell_type_ari": ari,
                     "n_objects": int(table.n_obs), "null_size": null_size,
                     "treatments": sorted(layout.loc[~layout["control"].astype(bool), "treatment"].unique())},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }


def work_folder_name(seed: int, **settings: Any) -> str:
    """Name of the working folder of one screen and pipeline run: the seed and a digest of its settings.

    A rerun with the same settings finds its screen and intermediates again (and only rescores); any other
    setting gets its own folder, so a cached result never answers for different settings.

    Parameters
    ----------
    seed
        The run's seed.
    **settings
        Every setting that shapes the screen or the pipeline (``nuclei_per_well`` required; ``treatments``
        and ``conv_layers`` are compared as sorted names and as integers).

    Returns
    -------
    ``screen_s{seed}_n{nuclei_per_well}_{10-hex digest}``.

    """
    import hashlib
    import json

    settings["treatments"] = sorted(settings["treatments"]) if settings.get("treatments") else None
    settings["conv_layers"] = [int(c) for c in settings["conv_layers"]]
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"screen_s{seed}_n{settings['nuclei_per_well']}_{digest}"


def _run_pipeline(sdata: Any, work: Path, *, seed: int, patch_size: int, conv_layers: Sequence[int], n_latent_dim: int,
                  epochs: int, radius: float, resolution: float, timings: dict[str, float]) -> tuple[Any, Any, int]:
    """Patches, CVAE, encoding with message passing, Leiden on the latents, graph statistics per well."""
    from . import Phenocoder
    from .clustering import cluster_features

    t = time.perf_counter()
    pheno = Phenocoder(sdata=sdata, table_key="nuclei_features", sample_key="sample", image_key="IF", seed=seed)
    n_channels = int(sdata.tables["nuclei_features"].n_vars)
    pheno.generate_dataset("screen", work / "datasets", patch_size=(patch_size, patch_size), scale_per_sample=False,
                           progress=False)
    pheno.initialize_model(n_latent_dim=n_latent_dim, n_dense_dim=64, conditions=[],
                           input_shape=(patch_size, patch_size, n_channels), conv_layers=tuple(conv_layers), flip=True)
    pheno.train(n_epochs=epochs, plot=False, verbose=0)
    pheno.encode(spatial_message_passing_radius=radius, progress=False)
    table = pheno.sdata.tables["phenocoder"]
    timings["model"] = time.perf_counter() - t

    t = time.perf_counter()
    labels, _ = cluster_features(table, resolution=resolution, seed=seed)
    table.obs["leiden"] = pd.Categorical(np.asarray(labels).astype(str))
    pheno.spatialgraph_stats(cluster_key="leiden", radii=(radius, 2 * radius), table_key="phenocoder",
                             progress=False)
    stats = pheno.adata
    ok = stats.obs["status"].astype(str) == "ok" if "status" in stats.obs.columns else np.ones(stats.n_obs, bool)
    stats = stats[np.asarray(ok)].copy()
    timings["graph_stats"] = time.perf_counter() - t
    return table, stats, int(len(set(np.asarray(labels))))


def _cluster_ari(table: Any, screen_dir: Path) -> float | None:
    """Adjusted Rand index of the latent clusters against the planted cell types (None without ground truth)."""
    from sklearn.metrics import adjusted_rand_score

    frames = []
    for plate in sorted(p for p in screen_dir.iterdir() if p.is_dir()):
        path = plate / "ground_truth" / "objects.csv"
        if path.is_file():
            truth = pd.read_csv(path, dtype={"well": str})
            truth["key"] = plate.name + "_" + truth["well"] + "/" + truth["label"].astype(str)
            frames.append(truth)
    if not frames:
        return None
    truth = pd.concat(frames).set_index("key")["cell_type"]
    key = table.obs["sample"].astype(str) + "/" + table.obs["instance_id"].astype(str)
    planted = truth.reindex(key.to_numpy())
    ok = planted.notna().to_numpy()
    return float(adjusted_rand_score(planted.to_numpy()[ok], table.obs["leiden"].astype(str).to_numpy()[ok]))
