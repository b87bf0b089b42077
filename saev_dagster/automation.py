"""One automation sensor over everything, sources included (without them nothing is observed)."""

import dagster as dg

automation_sensor = dg.AutomationConditionSensorDefinition(
    "saev_automation",
    target=dg.AssetSelection.all(include_sources=True),
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Observes the ViT checkpoint and the images every 5 minutes and re-runs what they make stale.",
)
