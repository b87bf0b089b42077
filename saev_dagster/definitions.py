"""The code location: `dagster dev -w workspace.yaml` loads `defs`. No torch is imported here."""

import dagster as dg

from saev_core import pipeline
from saev_dagster.assets.activations import build_activations_asset
from saev_dagster.assets.sae_sweep import build_sae_sweep_asset
from saev_dagster.assets.sources import image_source, vit_checkpoint
from saev_dagster.assets.topk_visuals import build_topk_visuals_asset, build_topk_visuals_check
from saev_dagster.automation import automation_sensor
from saev_dagster.partitions import layer_partitions

PIPELINE = pipeline.load_pipeline()
LAYERS = layer_partitions(PIPELINE.activations.vit_layers)

defs = dg.Definitions(
    assets=[
        vit_checkpoint, image_source, build_activations_asset(LAYERS), build_sae_sweep_asset(LAYERS),
        build_topk_visuals_asset(LAYERS),
    ],
    asset_checks=[build_topk_visuals_check(LAYERS)],
    sensors=[automation_sensor],
)
