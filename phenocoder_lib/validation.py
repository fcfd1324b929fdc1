"""Planted-truth validation of the embeddings against a synthetic plate's cell types and treatments.

``python -m phenocoder_lib.validation [--out DIR] [--wells-per-treatment 6] [--epochs 15]`` generates a
fresh seeded synthetic plate, runs the whole pipeline and prints one table:

- cell-type recovery (adjusted Rand index, normalized mutual information) of clusters of the CVAE latents,
  of the message-passed latents, and of the plain measurement table (the baseline), all clustered the
  same way (:func:`phenocoder_lib.clustering.cluster_features`);
- treatment separation of the wells (silhouette and leave-one-out 1-NN accuracy) on the well embedding
  from all spatial-statistics groups and from the cluster composition alone.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def clustering_scores(truth: Sequence[Any], labels: Sequence[Any]) -> dict[str, float]:
    """Adjusted Rand index and normalized mutual information of ``labels`` against ``truth``."""
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
    """Silhouette and leave-one-out 1-nearest-neighbour accuracy of wells ``x`` (n_wells, d) by treatment."""
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
    """Planted cell type per object and treatment per sample, aligned with ``table.obs``."""
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


def run_validation(
    out: str | Path,
    *,
    wells_per_treatment: int = 6,
    nuclei_per_well: int = 150,
    epochs: int = 15,
    patch_size: int = 32,
    radius: float = 25.0,
    resolution: float = 0.3,
    seed: int = 0,
) -> pd.DataFrame:
    """Run the pipeline on a fresh synthetic plate and score it against the planted truth.

    Returns a table with one row per (what, representation) and columns for each score.
    """
    from . import Phenocoder
    from .clustering import cluster_features
    from .ingest import read_plate
    from .synthetic import make_synthetic_plate

    out = Path(out)
    plate = out / "validation_plate"
    if not plate.exists():
        make_synthetic_plate(plate, n_wells=2 * wells_per_treatment, ndim=3, image_size=256, n_z=6,
                             nuclei_per_well=nuclei_per_well, seed=seed)
    sdata = read_plate(plate)
    pheno = Phenocoder(sdata=sdata, table_key="nuclei_features", sample_key="sample", image_key="IF", seed=seed)
    n_channels = sdata.tables["nuclei_features"].n_vars
    pheno.generate_dataset("validation", out / "datasets", patch_size=(patch_size, patch_size), progress=False)
    pheno.initialize_model(n_latent_dim=16, n_dense_dim=64, conditions=[],
                           input_shape=(patch_size, patch_size, n_channels),
                           conv_layers=(32, 64, 128), flip=True)
    pheno.train(n_epochs=epochs, plot=False)
    pheno.encode(spatial_message_passing_radius=radius)
    table = pheno.sdata.tables["phenocoder"]
    types, treatments = truth_for_table(table, plate)

    rows = []
    reps = {
        "latents": dict(adata=table),
        "message_passed_latents": dict(adata=table, layer="spatial_message_passing"),
        "feature_table_baseline": dict(adata=sdata.tables["nuclei_features"]),
    }
    for name, kw in reps.items():
        labels, _ = cluster_features(kw["adata"], layer=kw.get("layer"), resolution=resolution, seed=seed)
        truth = types.reindex(kw["adata"].obs_names).to_numpy()
        rows.append({"what": "cell types", "representation": name, **clustering_scores(truth, np.asarray(labels))})
        if name == "latents":
            table.obs["leiden"] = labels

    pheno.spatialgraph_stats(cluster_key="leiden", radii=(radius, 2 * radius), table_key="phenocoder", progress=False)
    pheno.spatialgraph_embedding(n_dim=min(8, pheno.adata.n_obs - 1), umap=False)
    wells = pheno.adata.obs_names.astype(str)
    y = treatments.reindex(wells).to_numpy()
    rows.append({"what": "treatments", "representation": "all spatial statistics",
                 **treatment_scores(pheno.adata.obsm["X_pca"], y)})
    composition = pd.crosstab(table.obs["sample"].astype(str), table.obs["leiden"], normalize="index").reindex(wells)
    rows.append({"what": "treatments", "representation": "cluster composition only",
                 **treatment_scores(composition.to_numpy(), y)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    """Command line entry point (prints the score table)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="phenocoder_validation")
    parser.add_argument("--wells-per-treatment", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_validation(args.out, wells_per_treatment=args.wells_per_treatment, epochs=args.epochs, seed=args.seed)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return result


if __name__ == "__main__":
    main()
