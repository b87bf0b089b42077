"""One automation sensor over every asset (the observation sensor, ``saev_dagster.observation``, observes the
sources). It is RUNNING by default: a user who replaces a checkpoint expects the re-run without looking for a
switch."""

import dagster as dg

automation_sensor = dg.AutomationConditionSensorDefinition(
    "saev_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-runs what new observations of the ViT checkpoint, the images or the [watch] folder make stale, "
    "downstream in dependency order (blocking checks first).",
)
