"""Planted-truth evaluation: how well the pipeline recovers a synthetic plate's cell types and treatments.

This module is the ``phenocoder validate`` command: ``phenocoder validate`` (or
``python -m phenocoder_lib.evaluation``) with ``[--out DIR]
[--wells-per-treatment 6] [--epochs 15] [--seed 0]`` generates a fresh seeded synthetic plate, runs the
whole pipeline and prints one table:

- cell-type recovery (adjusted Rand index, normalized mutual information) of clusters of the CVAE latents,
  of the message-passed latents, and of the plain measurement table (the baseline: per-channel mean
  intensities, and the same plus the morphology columns), all clustered with one procedure
  (:func:`phenocoder_lib.clustering.cluster_features`, standardised, PCA, kNN, Leiden at one fixed
  ``resolution``); ``ari_best_of_sweep`` is the best ARI over a small resolution sweep (an oracle upper
  bound, the same sweep for every representation);
- treatment separation of the wells (silhouette and leave-one-out 1-NN accuracy) on the well embedding
  of all spatial-statistics groups, on each group alone, and on the cluster composition alone (no
  spatial statistics);

and whether the targets are met (:data:`TARGETS`). With ``--json`` it scores well profiles on the harder
multi-plate synthetic screen instead (:mod:`phenocoder_lib.screen_evaluation`: retrieval mAP with copairs per
representation) and prints one JSON document. :func:`planted_truth_metrics` scores an existing run
(cluster labels and a well embedding) when the plate folders hold ground truth, for the Dagster
``embedding`` asset.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: Targets the pipeline must meet on the planted-truth plate: clusters of the latents recover the planted cell
#: types, and the well embedding separates the treatments. Each is (row "what", row "representation", score
#: column, threshold) of the :func:`run_evaluation` table.
TARGETS = {
    "latent clusters ARI >= 0.8": ("cell types", "latents", "ari", 0.8),
    "leave-one-out treatment accuracy >= 0.95": ("treatments", "all spatial statistics", "loo_knn_accuracy", 0.95),
}
#: Leiden resolutions of the oracle sweep (``ari_best_of_sweep``).
RESOLUTION_SWEEP = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
#: Measurement-table columns of the morphology baseline (those present are used).
MORPHOLOGY_COLUMNS = ("area", "eccentricity", "major_axis_length", "minor_axis_length", "volume_um3")
#: Spatial-statistics groups scored one at a time.
STAT_GROUPS = ("interactions", "centrality", "connectivity", "moran_features", "moran_clusters", "chull")


def clustering_scores(truth: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """Score cluster ``labels`` against the planted ``truth`` (adjusted Rand index, normalized mutual information).

    Parameters
    ----------
    truth
        Planted class per object.
    labels
        Cluster label per object, in the same order.

    Returns
    -------
    dict
        ``ari``, ``nmi`` and ``n_clusters`` (distinct labels).

    Raises
    ------
    ValueError
        ``truth`` and ``labels`` are not 1-D sequences of the same length.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth, labels = np.asarray(truth), np.asarray(labels)
    if truth.shape != labels.shape or truth.ndim != 1:
        raise ValueError(f"truth and labels must be 1-D of the same length, got {truth.shape} and {labels.shape}.")
    return {
        "ari": float(adjusted_rand_score(truth, labels)),
        "nmi": float(normalized_mutual_info_score(truth, labels)),
        "n_clusters": int(len(np.unique(labels))),
    }


def treatment_scores(x: np.ndarray, treatments: Sequence[Any]) -> dict[str, float]:
    """Score how well an embedding of wells separates their treatments.

    Parameters
    ----------
    x
        Well embedding, shape (n_wells, d).
    treatments
        Planted treatment per well (row of ``x``).

    Returns
    -------
    dict
        ``silhouette`` (Euclidean, by treatment) and ``loo_knn_accuracy`` (the share of wells whose
        nearest other well has the same treatment).

    Raises
    ------
    ValueError
        Fewer than two treatments.
    """
    from sklearn.metrics import pairwise_distances, silhouette_score

    x = np.asarray(x, dtype=np.float64)
    treatments = np.asarray(treatments)
    if len(np.unique(treatments)) < 2:
        raise ValueError("treatment_scores needs at least two treatments.")
    d = pairwise_distances(x)
    np.fill_diagonal(d, np.inf)
    predicted = treatments[d.argmin(axis=1)]
    return {
        "silhouette": float(silhouette_score(x, treatments)),
        "loo_knn_accuracy": float((predicted == treatments).mean()),
    }


def truth_for_table(table: Any, plate_root: str | Path, *, sample_key: str = "sample") -> tuple[pd.Series, pd.Series]:
    """Return the planted cell type of every object and the treatment of every sample of ``table``.

    Parameters
    ----------
    table
        Object table (AnnData) of a synthetic plate, with ``.obs`` columns ``well``, ``instance_id`` and
        ``sample_key``.
    plate_root
        Folder of the synthetic plate (it holds ``ground_truth/``).
    sample_key
        ``.obs`` column with each object's sample id.

    Returns
    -------
    cell_types : pandas.Series
        Planted cell type, indexed by ``table.obs_names``.
    treatments : pandas.Series
        Planted treatment, indexed by sample id (strings).

    Raises
    ------
    ValueError
        An object of the table has no planted cell type.
    """
    from .synthetic import read_ground_truth

    objects, wells = read_ground_truth(plate_root)
    key = objects["well"].astype(str) + "/" + objects["label"].astype(str)
    cell_type = pd.Series(objects["cell_type"].to_numpy(), index=key)
    obs_key = table.obs["well"].astype(str) + "/" + table.obs["instance_id"].astype(str)
    types = pd.Series(cell_type.reindex(obs_key.to_numpy()).to_numpy(), index=table.obs_names, name="cell_type")
    if types.isna().any():
        raise ValueError(f"{int(types.isna().sum())} objects of the table have no planted cell type in {plate_root}.")
    treatment = wells.set_index("well")["treatment"]
    per_sample = table.obs.groupby(sample_key, observed=True)["well"].first().astype(str).map(treatment)
    per_sample.index = per_sample.index.astype(str)
    return types, per_sample


def has_ground_truth(plate_dir: str | Path) -> bool:
    """Tell whether ``plate_dir`` holds a synthetic plate's ``ground_truth/{objects,wells}.csv``.

    Parameters
    ----------
    plate_dir
        A plate folder.

    Returns
    -------
    bool
        Whether both ground-truth files exist.
    """
    folder = Path(plate_dir) / "ground_truth"
    return (folder / "objects.csv").is_file() and (folder / "wells.csv").is_file()


def planted_truth_metrics(
    sample_wells: Mapping[str, tuple[str | Path, str]],
    *,
    embedding: np.ndarray | None = None,
    samples: Sequence[str] | None = None,
    object_labels: pd.DataFrame | None = None,
) -> dict[str, float] | None:
    """Score an existing run against planted truth, or return ``None`` when no plate has ground truth.

    Only samples whose plate folder holds ground truth (:func:`has_ground_truth`) are scored.

    Parameters
    ----------
    sample_wells
        ``sample -> (plate folder, well)`` for every sample of the run.
    embedding, samples
        Well embedding (n_samples, d) and its sample names (row order): scored for treatments
        (``treatment_silhouette``, ``treatment_loo_knn_accuracy``) when the samples with ground truth
        cover at least two treatments and more wells than treatments (a treatment with a single well
        counts against the leave-one-out accuracy: its well can only be misclassified).
    object_labels
        Columns ``sample``, ``label`` (the object's label id in the well) and ``cluster``: scored for
        cell types (``cell_type_ari``, ``cell_type_nmi``, ``n_clusters``, ``n_objects``).

    Returns
    -------
    dict or None
        The scores named above that could be computed, and ``n_samples_with_truth``; ``None`` when no
        sample's plate holds ground truth.
    """
    from .synthetic import read_ground_truth

    truth: dict[str, tuple[pd.Series, str | None]] = {}
    cache: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    for sample, (plate_dir, well) in sample_wells.items():
        if not has_ground_truth(plate_dir):
            continue
        key = str(Path(plate_dir).resolve())
        if key not in cache:
            cache[key] = read_ground_truth(plate_dir)
        objects, wells = cache[key]
        obj = objects[objects["well"].astype(str) == str(well)]
        types = pd.Series(obj["cell_type"].astype(str).to_numpy(), index=obj["label"].astype(np.int64).to_numpy())
        treatment = wells.set_index(wells["well"].astype(str))["treatment"].get(str(well))
        truth[str(sample)] = (types, None if pd.isna(treatment) else str(treatment))
    if not truth:
        return None
    out: dict[str, float] = {"n_samples_with_truth": float(len(truth))}
    if object_labels is not None and len(object_labels):
        ol = object_labels[object_labels["sample"].astype(str).isin(truth)]
        planted = [truth[s][0].get(int(lab)) for s, lab in zip(ol["sample"].astype(str), ol["label"], strict=True)]
        keep = np.array([p is not None for p in planted], dtype=bool)
        if keep.any():
            scores = clustering_scores(np.asarray(planted, dtype=object)[keep].astype(str),
                                       ol["cluster"].astype(str).to_numpy()[keep])
            out.update({"cell_type_ari": scores["ari"], "cell_type_nmi": scores["nmi"],
                        "n_clusters": float(scores["n_clusters"]), "n_objects": float(keep.sum())})
    if embedding is not None and samples is not None:
        rows = [i for i, s in enumerate(samples) if str(s) in truth and truth[str(s)][1] is not None]
        y = np.array([truth[str(samples[i])][1] for i in rows])
        _, counts = np.unique(y, return_counts=True)
        if len(counts) >= 2 and len(y) > len(counts):  # silhouette needs 2 <= n_labels < n_samples
            scores = treatment_scores(np.asarray(embedding)[rows], y)
            out.update({"treatment_silhouette": scores["silhouette"],
                        "treatment_loo_knn_accuracy": scores["loo_knn_accuracy"]})
    return out


def _cluster_rows(name: str, adata: Any, truth: np.ndarray, *, layer: str | None, resolution: float,
                  seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Cluster one representation and score it (at ``resolution`` and best over the sweep); return row, labels."""
    from .clustering import cluster_features

    labels, _ = cluster_features(adata, layer=layer, resolution=resolution, seed=seed)
    labels = np.asarray(labels)
    row = {"what": "cell types", "representation": name, **clustering_scores(truth, labels)}
    best = row["ari"]
    for r in RESOLUTION_SWEEP:
        if r != resolution:
            swept, _ = cluster_features(adata, layer=layer, resolution=r, seed=seed)
            best = max(best, clustering_scores(truth, np.asarray(swept))["ari"])
    row["ari_best_of_sweep"] = best
    return row, labels


def run_evaluation(
    out: str | Path,
    *,
    wells_per_treatment: int = 6,
    nuclei_per_well: int = 150,
    epochs: int = 15,
    patch_size: int = 16,
    conv_layers: Sequence[int] = (32, 64),
    scale_per_sample: bool = False,
    radius: float = 25.0,
    resolution: float = 0.02,
    seed: int = 0,
) -> pd.DataFrame:
    """Run the pipeline on a fresh synthetic plate and score it against the planted truth.

    The defaults are what the planted-truth recovery needed (docs/model.md, "What mattered for
    planted-truth recovery"): a patch that frames the nucleus (16 px for nuclei of up to ~14 px; a
    32 px patch holds several neighbours, which then dominate the latent) and one set of intensity
    anchors for the plate (``scale_per_sample=False``: per-well anchors stretch a channel whose cell
    type is missing from a well, so the same cell type looks different in different wells).

    Parameters
    ----------
    out
        Working folder; the plate, datasets and model go to ``out/w{wells_per_treatment}_n{nuclei_per_well}_s{seed}``
        (a plate already there is reused).
    wells_per_treatment
        Wells of each of the two treatments.
    nuclei_per_well
        Nuclei per well of the synthetic plate.
    epochs
        Training epochs of the CVAE.
    patch_size
        Square patch size in pixels.
    conv_layers
        Filters of the encoder's convolution layers.
    scale_per_sample
        Per-well intensity anchors (``True``) or one set for the plate.
    radius
        Message-passing radius; the spatial statistics use ``radius`` and ``2 * radius``.
    resolution
        Leiden resolution, the same for every representation.
    seed
        Seed of the plate, the model and the clustering.

    Returns
    -------
    pandas.DataFrame
        One row per (``what``, ``representation``): cell-type rows with ``ari``, ``nmi``, ``n_clusters``
        and ``ari_best_of_sweep``; treatment rows with ``silhouette``, ``loo_knn_accuracy``, ``n_wells``
        and ``n_wells_skipped``.
    """
    import anndata as ad

    from . import Phenocoder
    from .ingest import read_plate
    from .synthetic import make_synthetic_plate

    work = Path(out) / f"w{wells_per_treatment}_n{nuclei_per_well}_s{seed}"
    plate = work / "plate"
    if not plate.exists():
        make_synthetic_plate(plate, n_wells=2 * wells_per_treatment, ndim=3, image_size=256, n_z=6,
                             nuclei_per_well=nuclei_per_well, seed=seed)
    sdata = read_plate(plate)
    pheno = Phenocoder(sdata=sdata, table_key="nuclei_features", sample_key="sample", image_key="IF", seed=seed)
    features = sdata.tables["nuclei_features"]
    n_channels = features.n_vars
    pheno.generate_dataset("validation", work / "datasets", patch_size=(patch_size, patch_size),
                           scale_per_sample=scale_per_sample, progress=False)
    pheno.initialize_model(n_latent_dim=16, n_dense_dim=64, conditions=[],
                           input_shape=(patch_size, patch_size, n_channels),
                           conv_layers=tuple(conv_layers), flip=True)
    pheno.train(n_epochs=epochs, plot=False, verbose=0)
    pheno.encode(spatial_message_passing_radius=radius, progress=False)
    table = pheno.sdata.tables["phenocoder"]
    types, treatments = truth_for_table(table, plate)

    morph = [c for c in MORPHOLOGY_COLUMNS if c in features.obs.columns]
    with_morph = ad.AnnData(np.hstack([np.asarray(features.X, dtype=np.float64),
                                       features.obs[morph].to_numpy(np.float64)]), obs=features.obs[[]].copy())
    reps = {
        "latents": (table, None),
        "message_passed_latents": (table, "spatial_message_passing"),
        "feature_table_baseline (intensities)": (features, None),
        "feature_table_baseline (+ morphology)": (with_morph, None),
    }
    rows = []
    for name, (adata, layer) in reps.items():
        truth = types.reindex(adata.obs_names).to_numpy()
        row, labels = _cluster_rows(name, adata, truth, layer=layer, resolution=resolution, seed=seed)
        rows.append(row)
        if name == "latents":
            table.obs["leiden"] = pd.Categorical(labels)

    pheno.spatialgraph_stats(cluster_key="leiden", radii=(radius, 2 * radius), table_key="phenocoder", progress=False)
    pheno.spatialgraph_embedding(n_dim=min(8, pheno.adata.n_obs - 1), umap=False)
    emb = pheno.adata
    # wells whose statistics were skipped (status != 'ok') have no embedding; they are counted, not scored
    ok = np.isfinite(np.asarray(emb.obsm["X_pca"])).all(axis=1)
    if (~ok).any():
        logger.warning("%d wells without spatial statistics are left out of the treatment scores: %s",
                       int((~ok).sum()), list(emb.obs_names[~ok]))
    emb = emb[ok]
    wells = emb.obs_names.astype(str)
    y = treatments.reindex(wells).to_numpy()
    n_wells = {"n_wells": int(ok.sum()), "n_wells_skipped": int((~ok).sum())}
    rows.append({"what": "treatments", "representation": "all spatial statistics", **n_wells,
                 **treatment_scores(emb.obsm["X_pca"], y)})
    for group in STAT_GROUPS:
        cols = [i for i, v in enumerate(emb.var_names) if f"_stat:{group}_" in str(v)]
        if cols:
            rows.append({"what": "treatments", "representation": f"{group} only", **n_wells,
                         **treatment_scores(np.asarray(emb.X)[:, cols], y)})
    composition = pd.crosstab(table.obs["sample"].astype(str), table.obs["leiden"], normalize="index").reindex(wells)
    rows.append({"what": "treatments", "representation": "cluster composition only (no spatial statistics)",
                 **n_wells, **treatment_scores(composition.to_numpy(), y)})
    return pd.DataFrame(rows)


def check_targets(result: pd.DataFrame) -> pd.DataFrame:
    """Compare a :func:`run_evaluation` table with :data:`TARGETS` (and latents ARI with every baseline's ARI).

    Parameters
    ----------
    result
        The table of :func:`run_evaluation`.

    Returns
    -------
    pandas.DataFrame
        One row per target: ``target``, ``value``, ``threshold`` and ``met``.
    """
    rows = []
    for target, (what, rep, col, threshold) in TARGETS.items():
        value = float(result.loc[(result["what"] == what) & (result["representation"] == rep), col].iloc[0])
        rows.append({"target": target, "value": value, "threshold": threshold, "met": value >= threshold})
    cells = result[result["what"] == "cell types"].set_index("representation")["ari"]
    baseline = float(cells[[i for i in cells.index if i.startswith("feature_table_baseline")]].max())
    rows.append({"target": "latent clusters ARI > feature-table baseline ARI", "value": float(cells["latents"]),
                 "threshold": baseline, "met": float(cells["latents"]) > baseline})
    return pd.DataFrame(rows)


def format_report(result: pd.DataFrame, targets: pd.DataFrame) -> str:
    """Format the score table and the target table as text.

    Parameters
    ----------
    result
        The table of :func:`run_evaluation`.
    targets
        The table of :func:`check_targets`.

    Returns
    -------
    str
        The cell-type, treatment and target tables, separated by blank lines.
    """
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        cells = result[result["what"] == "cell types"].dropna(axis=1, how="all").drop(columns="what")
        cells = cells.astype({"n_clusters": int})
        treat = result[result["what"] == "treatments"].dropna(axis=1, how="all").drop(columns="what")
        treat = treat.astype({c: int for c in ("n_wells", "n_wells_skipped") if c in treat.columns})
        fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
        return "\n\n".join([
            "Cell types (planted) vs clusters:\n" + cells.to_string(**fmt),
            "Treatments (planted) vs well embedding:\n" + treat.to_string(**fmt),
            "Targets:\n" + targets.to_string(**fmt),
        ])


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the arguments of the ``phenocoder validate`` command to ``parser``.

    Parameters
    ----------
    parser
        Parser (or sub-command parser) to extend; a new one described by this module's docstring if ``None``.

    Returns
    -------
    argparse.ArgumentParser
        ``parser`` with the arguments added.
    """
    parser = parser or argparse.ArgumentParser(description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="phenocoder_validation", help="working folder (plate, datasets, model)")
    parser.add_argument("--wells-per-treatment", type=int, default=6)
    parser.add_argument("--nuclei-per-well", type=int, default=None,
                        help="nuclei per well (default 150 on the single plate, 270 on the --json screen)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 15 on the single plate, 25 on the --json screen)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=float, default=0.02,
                        help="Leiden resolution, the same for every representation (default 0.02)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a target is missed")
    parser.add_argument("--json", action="store_true",
                        help="score well profiles on the multi-plate synthetic screen (retrieval mAP per "
                        "representation, phenocoder_lib.screen_evaluation) and print one JSON document")
    parser.add_argument("--plates", type=int, default=3, help="plates of the --json screen (default 3)")
    parser.add_argument("--null-size", type=int, default=10000,
                        help="permutations of the mAP p-values (--json; default 10000)")
    parser.add_argument("--no-cellprofiler", action="store_true",
                        help="leave the CellProfiler (cp_measure) baseline out of --json")
    return parser


def json_safe(value: Any) -> Any:
    """Return ``value`` with NaN/inf as ``None`` and numpy scalars as Python ones, so it dumps as strict JSON.

    Parameters
    ----------
    value
        A number, or dicts, lists and tuples of them (nested); dict keys become strings.

    Returns
    -------
    Any
        The converted value (tuples become lists).
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value




def run_from_args(args: argparse.Namespace) -> int:
    """Run the evaluation that parsed ``phenocoder validate`` arguments ask for and print its report.

    Parameters
    ----------
    args
        Arguments parsed by :func:`build_parser`; with ``--json`` the multi-plate screen is scored
        (:mod:`phenocoder_lib.screen_evaluation`) and printed as one JSON document.

    Returns
    -------
    int
        Exit status: 1 with ``--strict`` when a target is missed, else 0.
    """
    import time

    if getattr(args, "json", False):
        import json

        from .screen_evaluation import run_screen_validation

        doc = run_screen_validation(args.out, seed=args.seed, n_plates=args.plates,
                                    nuclei_per_well=args.nuclei_per_well or 270, epochs=args.epochs or 25,
                                    resolution=args.resolution, cellprofiler=not args.no_cellprofiler,
                                    null_size=args.null_size)
        print(json.dumps(json_safe(doc), indent=2, allow_nan=False))
        return 1 if args.strict and not all(t["met"] for t in doc["targets"]) else 0
    nuclei, epochs = args.nuclei_per_well or 150, args.epochs or 15
    start = time.perf_counter()
    result = run_evaluation(args.out, wells_per_treatment=args.wells_per_treatment,
                            nuclei_per_well=nuclei, epochs=epochs, seed=args.seed,
                            resolution=args.resolution)
    targets = check_targets(result)
    print(format_report(result, targets))
    print(f"\nseed {args.seed}, {args.wells_per_treatment} wells per treatment, {nuclei} nuclei per "
          f"well, {epochs} epochs, Leiden resolution {args.resolution}: {time.perf_counter() - start:.0f} s")
    return 1 if args.strict and not bool(targets["met"].all()) else 0


def main(argv: list[str] | None = None) -> int:
    """Run ``phenocoder validate`` from the command line (prints the score and target tables).

    Parameters
    ----------
    argv
        Command-line arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status (see :func:`run_from_args`).
    """
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
