"""The code location: `dagster dev -w workspace.yaml` loads `defs`, a `@dg.definitions` function that Dagster
calls when it loads the location, so importing this module reads no pipeline file. No torch is imported here.

The pipeline file ($SAEV_PIPELINE, else the embedded demo) is read once at load for the partitions, the observation
cron and the code versions, and handed to every asset, check and source as the `saev_pipeline` resource. A bad
file fails the load with one message naming the file and the key.
"""

import dagster as dg

from saev_core.errors import UserError
from saev_core.pipeline import file as pipeline_file
from saev_dagster.assets.activations import build_activations_asset
from saev_dagster.assets.dropped import build_dropped_assets
from saev_dagster.assets.probe_metrics import build_probe_metrics_asset
from saev_dagster.assets.sae_sweep import build_sae_sweep_asset
from saev_dagster.assets.sources import build_sources
from saev_dagster.assets.sweep_report import build_sweep_report_asset
from saev_dagster.assets.topk_visuals import build_topk_visuals_asset, build_topk_visuals_check
from saev_dagster.automation import automation_sensor
from saev_dagster.deployment import choose_executor, io_manager_resources
from saev_dagster.partitions import layer_partitions
from saev_dagster.resources import SaevPipeline

LAYER_JOB = "layer_assets"
REPORT_JOB = "sweep_report_job"


class PipelineFileError(Exception):
    """The pipeline file cannot be used; the message names the file, the key and the fix."""


def build_definitions(path: str | None = None, executor: str | None = None) -> dg.Definitions:
    """The code location of a pipeline file; executor: "multiprocess" or "k8s" (None: $SAEV_DAGSTER_EXECUTOR)."""
    path = path or pipeline_file.default_pipeline_path()
    try:
        pipe = pipeline_file.load_pipeline(path)
    except UserError as err:
        raise PipelineFileError(str(err)) from None
    layers = layer_partitions(pipe.activations.vit_layers)
    return dg.Definitions(
        assets=[
            *build_sources(pipe.automation.observe_cron),
            build_activations_asset(layers, pipe.code_version("activations"), pipe.activations.device),
            build_sae_sweep_asset(layers, pipe.code_version("sae_sweep")),
            build_topk_visuals_asset(layers, pipe.code_version("topk_visuals"), after_probes=pipe.probe is not None),
            build_sweep_report_asset(layers.get_partition_keys(), pipe.code_version("sweep_report")),
            *(build_dropped_assets(pipe.automation.observe_cron) if pipe.watch.folder else []),
            *([build_probe_metrics_asset(layers, pipe.code_version("probe_metrics"))] if pipe.probe else []),
        ],
        asset_checks=[build_topk_visuals_check(layers)],
        jobs=[
            dg.define_asset_job(
                LAYER_JOB,
                selection=dg.AssetSelection.assets("activations", "sae_sweep", "topk_visuals"),
                description="Record, train and render, one layer partition.",
            ),
            dg.define_asset_job(
                REPORT_JOB,
                selection=dg.AssetSelection.assets("sweep_report"),
                description="The sweep report over every layer.",
            ),
        ],
        sensors=[automation_sensor],
        resources={"saev_pipeline": SaevPipeline(path=path), **io_manager_resources()},
        executor=choose_executor(executor),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The code location of $SAEV_PIPELINE (else the embedded demo pipeline), built when Dagster loads it."""
    return build_definitions()
