"""Nightly refresh of the cross-sample assets."""

from __future__ import annotations

from dagster import DefaultScheduleStatus, ScheduleDefinition

from .jobs import refresh_summaries_job

nightly_refresh_schedule = ScheduleDefinition(
    name="nightly_refresh",
    job=refresh_summaries_job,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every night at 03:00 UTC: re-embed the spatial statistics of all samples (embedding).",
)
