"""What every metadata key of every asset means: one table, shown in the asset descriptions and in docs/metadata.md.

The asset descriptions (the UI's asset page) end with the keys of that asset, and
``docs/metadata.md`` is this table written out (:func:`markdown_table`; a test keeps the file in step
with this module and checks that every key an asset records is explained here). Keys ending in
``*`` are families (``seconds_*``: one key per timed phase).
"""

from __future__ import annotations

import fnmatch

#: Shared by several assets.
_COMMON = {
    "path": "Where the asset's data lives (folder or main file under the storage root).",
    "seconds_*": "Wall-clock seconds of one phase of the step (e.g. `seconds_read`, `seconds_train`).",
    "preview": "Picture of the result: click \"[Show Markdown]\" to open it (downscaled to fit the dialog).",
    "preview_path": "Full-size PNG of the preview next to the data.",
}

#: asset -> {metadata key: explanation}. Order is the order shown.
METADATA: dict[str, dict[str, str]] = {
    "sdata": {
        "preview": _COMMON["preview"] + " Maximum projection of the well, first three channels as RGB.",
        "n_objects": "Segmented objects (nuclei) in the well's table.",
        "n_features": "Per-object feature columns read from the plate's tables (e.g. intensities).",
        "image_shape": "Dimensions of the well's image (c = channels, z = slices, y, x in pixels).",
        "plate_dir": "Plate export folder the well was read from.",
        "source_digest": "Digest of the names, sizes and times of the well's files; the sensor reruns a well "
                         "only when it changes.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "patches": {
        "preview": _COMMON["preview"] + " Montage of the first 16 patches (first three channels as RGB).",
        "n_patches": "Patches written (one per object, or the seeded subset `n_patches` of the config).",
        "n_padded": "Patches of objects near the image border, zero-padded to the full patch size "
                    "(kept, not dropped).",
        "patch_size": "Patch height x width in pixels.",
        "channels": "Image channels stored in every patch, in order.",
        "anchors": "Normalization anchors per channel (the low/high intensity percentiles mapped to 0 and 1); "
                   "encoding reuses them so that new wells are scaled as the training wells were.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "model": {
        "reconstructions": "Picture: validation patches (input) beside their reconstructions.",
        "latent_space": "Picture: the validation patches' latent means projected on two axes.",
        "mlflow_run": "Link to the training run in the MLflow UI (address from `PHENOCODER_MLFLOW_UI_URL`, "
                      "default http://127.0.0.1:5000).",
        "mlflow_compare": "Link to MLflow's side-by-side comparison of this training and the one before it "
                          "(parameters and metric curves); absent for the first training.",
        "curves": "Picture: loss, reconstruction loss and KL loss per epoch (training and validation).",
        "mlflow_run_id": "Id of the MLflow run (parameters, metrics per epoch, artifacts).",
        "registered_model": "Registered model name/version and the alias that points to it.",
        "model_version": "Version of the registered model; `latents` records the version that encoded them.",
        "model_name": "Model folder name: its settings plus a digest of every parameter.",
        "samples": "Samples whose patches trained the model.",
        "n_train": "Training patches.",
        "n_val": "Validation patches (held out; `val_*` losses).",
        "epochs_run": "Epochs trained (early stopping may end before `n_epochs`).",
        "best_epoch": "Epoch with the lowest validation loss; its weights are the model's.",
        "final_loss": "Training loss (reconstruction + beta x KL) of the last epoch.",
        "final_val_loss": "Validation loss of the last epoch.",
        "final_reconstruction_loss": "Training reconstruction loss of the last epoch (summed over pixels).",
        "final_kl_loss": "Training KL divergence of the last epoch.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
    },
    "latents": {
        "preview": _COMMON["preview"] + " The well's latents on their first two principal components.",
        "n_objects": "Objects encoded (one latent vector each).",
        "n_latent_dim": "Latent dimensions.",
        "model": "Model that encoded them (`<registered model>/<version>`).",
        "model_version": "Registered model version that encoded them.",
        "mlflow_run_id": "MLflow run of that model's training.",
        "patch_source": "Where the patches came from: the stored patch dataset (`dataset store`) or cut "
                        "again from the well's image (`image`).",
        "anchor_source": "Which normalization anchors scaled the patches, as training did: the patch dataset "
                         "that holds the sample (`dataset '<name>'`), anchors computed from the sample's own "
                         "patches (a sample not seen in training), global anchors, or none (`scale=False`).",
        "message_passing_radius": "Radius (um) of the spatial message passing layer, `None` when off.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "cluster_reference": {
        "preview": _COMMON["preview"] + " Reference objects on two principal components, coloured by cluster.",
        "n_clusters": "Leiden clusters found.",
        "n_objects": "Objects pooled from the reference samples.",
        "samples": "Reference samples.",
        "model": "Model whose latents were clustered.",
        "reference_id": "Id of this reference; `clusters` and `graph_stats` record it.",
        "cluster_sizes": "Objects per cluster.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "clusters": {
        "preview": _COMMON["preview"] + " The well's objects at their positions, coloured by cluster.",
        "n_objects": "Objects labelled.",
        "source": "`pooled`: labels of the reference clustering (the sample was a reference sample); "
                  "`transfer`: labels voted by the nearest reference objects.",
        "reference_id": "Cluster reference that labelled them.",
        "mean_confidence": "Mean share of the voting neighbours that agree with the label (1 for pooled labels).",
        "cluster_sizes": "Objects per cluster.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "graph_stats": {
        "preview": _COMMON["preview"] + " Cluster-by-cluster neighbourhood enrichment (z-score) at one radius: "
                   "red pairs are neighbours more often than by chance, blue less.",
        "n_rows": "Rows of statistics (one per well, or one per subunit).",
        "n_features": "Feature columns (`radius:{r}_stat:{group}_{column}`).",
        "n_skipped": "Rows skipped (too few objects; reason in the check's metadata).",
        "n_nan_values": "Undefined values (NaN), e.g. statistics of a cluster absent from the well.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "embedding": {
        "preview": _COMMON["preview"] + " Wells on the embedding's first two axes, coloured by treatment "
                   "(synthetic plates) or plate.",
        "n_samples": "Wells embedded.",
        "n_features": "Spatial statistics per well used for the embedding.",
        "n_components": "Principal components kept.",
        "samples": "Wells embedded, in row order.",
        "partitions_without_graph_stats": "Registered wells that have no `graph_stats` yet (not embedded).",
        "planted_truth/*": "Synthetic plates only: how well the pipeline recovers the planted truth. "
                           "`cell_type_ari`, `cell_type_nmi`: clusters against the planted cell types (adjusted "
                           "Rand index, normalized mutual information; 1 = perfect); `treatment_silhouette`, "
                           "`treatment_loo_knn_accuracy`: wells of a treatment close together in the embedding "
                           "(silhouette, leave-one-out 1-nearest-neighbour accuracy); `n_samples_with_truth`, "
                           "`n_clusters`, `n_objects`: what was scored.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
        "preview_path": _COMMON["preview_path"],
    },
    "well_profiles": {
        "n_samples": "Wells profiled (every well with latents).",
        "representations": "Profile tables written and their number of feature columns: `latents` (median "
                           "latent per well), `latents_message_passing` (median message-passed latent), "
                           "`graph_stats` (the well's spatial statistics).",
        "scored": "Whether a `layout.csv` beside a plate export said which wells are controls and replicates, "
                  "so that the profiles were normalized and scored; false: nothing is claimed.",
        "profiling/n_wells_with_layout": "Wells named by a layout (those scored).",
        "profiling/*": "Retrieval scores of one representation (copairs; see docs/profiling.md): "
                       "`map_activity`, mean average precision of retrieving a treatment's replicate wells "
                       "against the plate's negative controls; `map_consistency`, of retrieving treatments of "
                       "the same mechanism; `fraction_retrieved_activity`, treatments retrieved at q < 0.05; "
                       "`percent_replicating`, treatments whose replicate correlation beats the 95th "
                       "percentile of non-replicate pairs.",
        "path": _COMMON["path"],
        "seconds_*": _COMMON["seconds_*"],
    },
}

DOCS_PAGE = "docs/metadata.md"


def explain(asset: str, key: str) -> str | None:
    """Explanation of metadata ``key`` of ``asset`` (families such as ``seconds_*`` match), or ``None``."""
    table = METADATA.get(asset, {})
    if key in table:
        return table[key]
    for pattern, text in table.items():
        if pattern.endswith("*") and fnmatch.fnmatchcase(key, pattern):
            return text
    return None


def describe(asset: str, summary: str) -> str:
    """Asset description: ``summary`` then a Markdown list of the asset's metadata keys.

    Paths such as ``<root>/patches/<sample>/`` belong in backticks in ``summary``: the UI renders
    descriptions as Markdown with HTML, where a bare ``<root>`` is an (invisible) HTML tag.
    """
    lines = [summary.strip(), "", f"**Metadata** (also in {DOCS_PAGE}):", ""]
    lines += [f"- `{key}`: {text}" for key, text in METADATA[asset].items()]
    return "\n".join(lines)


def markdown_table() -> str:
    """The text of ``docs/metadata.md``."""
    out = ["# Asset metadata", "",
           "What each metadata entry on an asset's page in the Dagster UI means. Numbers are rounded to 4 "
           "significant digits. Pictures (`preview`, `curves`, `reconstructions`, `latent_space`) open with one "
           "click on \"[Show Markdown]\": Dagster 1.13 shows Markdown inline only under 1,000 characters, which "
           "no picture is. This page is generated from `phenocoder_assets/metadata_docs.py` "
           "(`python -m phenocoder_assets.metadata_docs > docs/metadata.md`).", ""]
    for asset, table in METADATA.items():
        out += [f"## `{asset}`", "", "| key | meaning |", "| --- | --- |"]
        out += [f"| `{key}` | {text.replace('|', '/')} |" for key, text in table.items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover - regenerates docs/metadata.md
    print(markdown_table(), end="")
