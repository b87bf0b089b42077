"""activations[layer]: one ViT pass records every selected layer into one zarr store."""

import dagster as dg

from saev_dagster.config import ActivationsRunConfig
from saev_dagster.metadata import previous_materialization
from saev_dagster.partitions import layers_of
from saev_dagster.resources import SaevPipeline, fail_clearly

CHECK = "activations_match_vit"


def build_activations_asset(partitions_def: dg.PartitionsDefinition, code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="activations",
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=["vit_checkpoint", "image_source"],
        automation_condition=dg.AutomationCondition.eager(),
        group_name="recording",
        kinds={"pytorch", "zarr"},
        tags={"stage": "recording"},
        owners=["team:saev"],
        code_version=code_version,
        pool="gpu",
        check_specs=[dg.AssetCheckSpec(
            CHECK, asset="activations", blocking=True,
            description="Every block is complete, and a fresh forward pass over a few sampled images reproduces "
                        "their stored rows (tolerance by dtype).",
        )],
        description="ViT residual-stream activations of the pipeline's images, one zarr array per layer.",
    )
    def activations(
        context: dg.AssetExecutionContext, config: ActivationsRunConfig, saev_pipeline: SaevPipeline
    ) -> dg.MaterializeResult:
        from saev_core import pipeline, recording, verify
        from saev_core.files import join
        from saev_core.store import layer_name

        layers = layers_of(context.partition_keys)
        pipe = saev_pipeline.load()
        cfg = fail_clearly(pipe.activations_for, layers, **config.overrides())
        fail_clearly(pipeline.prepare_demo_checkpoint, pipe)
        result = fail_clearly(recording.record_activations, cfg, show_progress=False,
                              on_progress=_progress_logger(context))
        for layer, key in zip(layers, context.partition_keys):
            context.log_event(dg.AssetObservation(
                asset_key=context.asset_key, partition=key,
                metadata={"layer": layer, "array": join(result.path, layer_name(layer)), "shape": str(result.shape)},
            ))
        metadata = {
            "store_path": dg.MetadataValue.path(result.path),
            "layers": str(result.layers),
            "shape_per_layer": str(result.shape),
            "blocks_written": result.n_blocks_written,
            "imgs_skipped": result.n_skipped,
        }
        if result.n_imgs_written == 0:  # the store was complete: say so, with the figures of the run that wrote it
            metadata["reused_existing_store"] = True
            earlier = previous_materialization(context, "activations", context.partition_keys[0], result.path)
            for key in ("imgs_per_s", "mb_written", "run_id"):
                if earlier is not None and key in earlier:
                    metadata[f"written_by_earlier_run_{key}"] = earlier[key]
        else:
            metadata.update({
                "reused_existing_store": False,
                "imgs_per_s": dg.MetadataValue.float(round(result.imgs_per_s, 2)),
                "mb_written": dg.MetadataValue.float(round(result.bytes_written / 1e6, 2)),
                "run_id": context.run_id,
            })
        problems = fail_clearly(verify.store_problems, cfg, result.path)
        return dg.MaterializeResult(metadata=metadata, check_results=[dg.AssetCheckResult(
            check_name=CHECK, passed=not problems,
            metadata={"problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
        )])

    return activations


def _progress_logger(context: dg.AssetExecutionContext):
    """Log progress about every tenth of the work (tqdm bars do not show in Dagster's UI)."""
    state = {"next": 0.0}

    def log(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            context.log.info(f"recorded {done}/{total} images")
            state["next"] = done / total + 0.1

    return log
