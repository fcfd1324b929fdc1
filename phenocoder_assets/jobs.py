"""Jobs: the per-sample pipeline (sensor target), model training (manual) and the nightly refresh."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

#: Per-sample chain; the sensor narrows the selection to the stages that can run.
sample_pipeline_job = define_asset_job(
    name="sample_pipeline",
    selection=AssetSelection.assets("sdata", "patches", "latents", "clusters", "graph_stats"),
    description="Ingest, patch, encode, label and measure one well (one 'samples' partition).",
)

#: Training is a deliberate action (launch from the UI; compare runs in MLflow). Runs carry a tag that
#: the Kubernetes deployment limits to one at a time (deploy/helm/values.yaml, tagConcurrencyLimits).
train_model_job = define_asset_job(
    name="train_model",
    selection=AssetSelection.assets("model"),
    tags={"phenocoder/gpu": "true"},
    description="Train the model on the chosen samples' patch datasets (tracked in MLflow).",
)

#: Cross-sample summaries refreshed by the nightly schedule.
refresh_summaries_job = define_asset_job(
    name="refresh_summaries",
    selection=AssetSelection.assets("embedding"),
    description="Re-embed the spatial statistics of every sample (new wells included).",
)
