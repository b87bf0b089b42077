"""activations[layer]: one ViT pass records every selected layer into one zarr store."""

import dagster as dg

from saev_dagster.assets.sources import image_source, vit_checkpoint
from saev_dagster.config import ActivationsRunConfig
from saev_dagster.partitions import layers_of


def build_activations_asset(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="activations",
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=[vit_checkpoint, image_source],
        automation_condition=dg.AutomationCondition.eager(),
        kinds={"pytorch", "zarr"},
        description="ViT residual-stream activations of the pipeline's images, one zarr array per layer.",
    )
    def activations(context: dg.AssetExecutionContext, config: ActivationsRunConfig) -> dg.MaterializeResult:
        from saev_core import pipeline, recording
        from saev_core.errors import UserError
        from saev_core.store import join, layer_name

        layers = layers_of(context.partition_keys)
        try:
            pipe = pipeline.load_pipeline(config.pipeline or None)
            cfg = pipe.activations_for(layers, **config.overrides())
            pipeline.prepare_demo_checkpoint(pipe)
            result = recording.record_activations(cfg, show_progress=False, on_progress=_progress_logger(context))
        except UserError as err:
            raise dg.Failure(description=str(err)) from None
        mb = result.bytes_written / 1e6
        for layer, key in zip(layers, context.partition_keys):
            context.log_event(dg.AssetObservation(
                asset_key=context.asset_key, partition=key,
                metadata={"layer": layer, "array": join(result.path, layer_name(layer)), "shape": str(result.shape)},
            ))
        return dg.MaterializeResult(metadata={
            "store_path": dg.MetadataValue.path(result.path),
            "layers": str(result.layers),
            "shape_per_layer": str(result.shape),
            "imgs_per_s": dg.MetadataValue.float(round(result.imgs_per_s, 2)),
            "mb_written": dg.MetadataValue.float(round(mb, 2)),
            "blocks_written": result.n_blocks_written,
            "imgs_skipped": result.n_skipped,
        })

    return activations


def _progress_logger(context: dg.AssetExecutionContext):
    """Log progress about every tenth of the work (tqdm bars do not show in Dagster's UI)."""
    state = {"next": 0.0}

    def log(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            context.log.info(f"recorded {done}/{total} images")
            state["next"] = done / total + 0.1

    return log
