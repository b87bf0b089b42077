"""A second entry point for SAEs that come from elsewhere: `sae_checkpoints`, an observable source over the
pipeline's [watch] folder (one dynamic partition per file, data version = (size, mtime)), and `dropped_sae_visuals`,
which renders visuals for every file dropped there and again for a file changed in place. The observation sensor
(``saev_dagster.observation``) observes the folder with ``changed_files``."""

import dagster as dg

from saev_dagster.assets.common import source_asset_kwargs, stage_asset_kwargs
from saev_dagster.assets.sources import latest_observation
from saev_dagster.dagster_private import DATA_VERSION_TAG
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.metadata import png_markdown
from saev_dagster.resources import SaevPipeline

SAE_FILES = dg.DynamicPartitionsDefinition(name="sae_files")
GROUP = "dropped"


def build_dropped_assets() -> list:
    @dg.observable_source_asset(
        name="sae_checkpoints",
        partitions_def=SAE_FILES,
        **source_asset_kwargs("visuals", {"pytorch", "folder"}, group=GROUP),
        description="SAE checkpoint files in the [watch] folder; one partition per file name.",
    )
    @user_errors_fail_cleanly
    def sae_checkpoints(context, saev_pipeline: SaevPipeline) -> dg.DataVersionsByPartition:
        from saev_core.pipeline import watch

        files = watch.sae_files(saev_pipeline.load().watch.folder)
        new = [name for name in files if not context.instance.has_dynamic_partition(SAE_FILES.name, name)]
        if new:
            context.instance.add_dynamic_partitions(SAE_FILES.name, new)
            context.log.info(f"new SAE files: {new}")
        return dg.DataVersionsByPartition({name: dg.DataVersion(v) for name, v in files.items()})

    @dg.asset(
        name="dropped_sae_visuals",
        partitions_def=SAE_FILES,
        deps=["sae_checkpoints"],
        **stage_asset_kwargs("visuals", {"pytorch", "html"}, group=GROUP, gpu=True),
        description="Top-k visuals of one SAE file of the [watch] folder (saev 0.1.0 files need a provenance "
        "sidecar, <file>.provenance.json).",
    )
    @user_errors_fail_cleanly
    def dropped_sae_visuals(context: dg.AssetExecutionContext, saev_pipeline: SaevPipeline) -> dg.MaterializeResult:
        from saev_core.pipeline import stages
        from saev_core.visuals import gallery

        result = stages.dropped_sae_visuals(saev_pipeline.load(), context.partition_key, saev_pipeline.show_progress)
        return dg.MaterializeResult(
            metadata={
                "gallery": dg.MetadataValue.path(result.index_html),
                "preview: top images of 4 latents (PNG)": png_markdown(
                    gallery.preview_grid(result.dump_to, result.latents[:4], 6), "top images"
                ),
                "n_latents": len(result.latents),
                "n_heatmaps": result.n_heatmaps,
                "cache_reused": result.cache_reused,
            }
        )

    return [sae_checkpoints, dropped_sae_visuals]


def changed_files(folder: str, instance: dg.DagsterInstance) -> tuple[list[str], list[dg.AssetObservation]]:
    """(file names that are not yet partitions, observations of the files new or changed since their latest
    observation): what the observation sensor reports for the watched folder; both empty when nothing changed."""
    from saev_core.pipeline import watch

    files = watch.sae_files(folder)
    new = [name for name in files if not instance.has_dynamic_partition(SAE_FILES.name, name)]
    events = [
        dg.AssetObservation(asset_key="sae_checkpoints", partition=name, tags={DATA_VERSION_TAG: version})
        for name, version in files.items()
        if name in new or latest_observation(instance, "sae_checkpoints", name)[0] != version
    ]
    return new, events
