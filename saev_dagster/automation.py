"""One automation sensor over everything, sources included (without them nothing is observed). It is RUNNING by
default: a user who replaces a checkpoint expects the re-run without looking for a switch."""

import dagster as dg

automation_sensor = dg.AutomationConditionSensorDefinition(
    "saev_automation",
    target=dg.AssetSelection.all(include_sources=True),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Observes the ViT checkpoint and the images on [automation] observe_cron and re-runs what they make "
    "stale, downstream in dependency order (blocking checks first).",
)
