"""activations[layer]: one ViT pass records every selected layer into one zarr store.

A graph-backed asset so that recording can fan out: ``activations_store`` creates the store and hands out N disjoint
block ranges, ``record_activations_part`` (one op per range, in parallel under the multiprocess or k8s executor)
fills its blocks, and ``activations_verify`` checks the store and reports. With N = 1 it is one recording op.
"""

import time

import dagster as dg

from saev_dagster.assets.common import GPU_POOL, stage_asset_kwargs
from saev_dagster.assets.sources import as_observation, observe_checkpoint, observe_images
from saev_dagster.config import ActivationsRunConfig
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.metadata import previous_materialization
from saev_dagster.partitions import layers_of
from saev_dagster.resources import SaevPipeline

CHECK = "activations_match_vit"
NOTHING_INS = {"vit_checkpoint": dg.In(dg.Nothing), "image_source": dg.In(dg.Nothing)}


def gpu_op_tags(device: str) -> dict:
    """Op tags that ask dagster_k8s.k8s_job_executor for one GPU per recording op (ignored by local executors)."""
    if device == "cpu":
        return {}
    return {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}


def build_activations_asset(
    partitions_def: dg.PartitionsDefinition, code_version: str, device: str = "auto"
) -> dg.AssetsDefinition:
    @dg.op(ins=NOTHING_INS, out=dg.DynamicOut(dict))
    @user_errors_fail_cleanly
    def activations_store(context: dg.OpExecutionContext, config: ActivationsRunConfig, saev_pipeline: SaevPipeline):
        """Observe the sources this run reads, create the (empty) store, then one job per disjoint block range.

        Observed here, not only on the cron: a backfill on an instance whose sources were never observed would
        otherwise be stale at the first cron observation and recorded a second time."""
        from saev_core.record import recording

        layers = layers_of(context.partition_keys)
        pipe = saev_pipeline.load()
        context.log_event(
            as_observation("vit_checkpoint", observe_checkpoint(pipe, context.instance))
        )  # makes [demo] random weights
        context.log_event(as_observation("image_source", observe_images(pipe)))
        cfg = pipe.activations_for(layers, **config.overrides())
        path = recording.create_store(cfg)
        n = config.n_workers_fanout or pipe.n_workers_fanout
        context.log.info(f"recording layers {list(layers)} into {path} with {n} op(s)")
        for i in range(n):
            yield dg.DynamicOutput(
                {"layers": list(layers), "overrides": config.overrides(), "part": i, "n": n, "start": time.time()},
                mapping_key=f"part_{i}",
            )

    @dg.op(tags=gpu_op_tags(device), pool=GPU_POOL)
    @user_errors_fail_cleanly
    def record_activations_part(context: dg.OpExecutionContext, job: dict, saev_pipeline: SaevPipeline) -> dict:
        """Record this job's block range (all of it when n = 1); the last writer writes the statistics."""
        from saev_core.record import recording

        cfg = saev_pipeline.load().activations_for(tuple(job["layers"]), **job["overrides"])
        part = (job["part"], job["n"]) if job["n"] > 1 else None
        result = recording.record_activations(
            cfg, show_progress=saev_pipeline.show_progress, part=part, on_progress=_progress_logger(context)
        )
        return {**job, "result": result, "end": time.time()}

    @dg.op(out={"activations": dg.Out(dg.Nothing), "check": dg.Out(dg.Nothing)})
    @user_errors_fail_cleanly
    def activations_verify(context: dg.OpExecutionContext, parts: list[dict], saev_pipeline: SaevPipeline):
        """Check the finished store against a fresh forward pass and report the recording (or the earlier one)."""
        from saev_core.files import join
        from saev_core.record import recording, verify
        from saev_core.store import layer_name

        result = recording.RecordResult.combine(
            [p["result"] for p in parts], seconds=max(p["end"] for p in parts) - min(p["start"] for p in parts)
        )
        layers = layers_of(context.partition_keys)
        for layer, key in zip(layers, context.partition_keys):
            context.log_event(
                dg.AssetObservation(
                    asset_key="activations",
                    partition=key,
                    metadata={
                        "layer": layer,
                        "array": join(result.path, layer_name(layer)),
                        "shape": str(result.shape),
                    },
                )
            )
        metadata = {
            "store_path": dg.MetadataValue.path(result.path),
            "layers": str(result.layers),
            "shape_per_layer": str(result.shape),
            "blocks_written": result.n_blocks_written,
            "imgs_skipped": result.n_skipped,
            "recording_ops": len(parts),
        }
        if result.n_imgs_written == 0:  # the store was complete: say so, with the figures of the run that wrote it
            metadata["reused_existing_store"] = True
            earlier = previous_materialization(context, "activations", context.partition_keys[0], result.path)
            for key in ("imgs_per_s", "mb_written", "run_id"):
                if earlier is not None and key in earlier:
                    metadata[f"written_by_earlier_run_{key}"] = earlier[key]
        else:
            metadata.update(
                {
                    "reused_existing_store": False,
                    "imgs_per_s": dg.MetadataValue.float(round(result.imgs_per_s, 2)),
                    "mb_written": dg.MetadataValue.float(round(result.bytes_written / 1e6, 2)),
                    "run_id": context.run_id,
                }
            )
        cfg = saev_pipeline.load().activations_for(layers, **parts[0]["overrides"])
        problems = verify.store_problems(cfg, result.path)
        yield dg.Output(None, "activations", metadata=metadata)
        yield dg.AssetCheckResult(
            check_name=CHECK,
            asset_key="activations",
            passed=not problems,
            metadata={"problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
        )

    settings = stage_asset_kwargs("recording", {"pytorch", "zarr"}, code_version)

    @dg.graph_multi_asset(
        name="activations",
        outs={
            "activations": dg.AssetOut(
                key="activations",
                dagster_type=dg.Nothing,
                **settings,
                description="ViT residual-stream activations of the pipeline's images, one zarr array per layer.",
            )
        },
        ins={
            "vit_checkpoint": dg.AssetIn(dagster_type=dg.Nothing),
            "image_source": dg.AssetIn(dagster_type=dg.Nothing),
        },
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.single_run(),
        group_name=settings["group_name"],  # graph_multi_asset ignores an AssetOut's group (dagster 1.13)
        check_specs=[
            dg.AssetCheckSpec(
                CHECK,
                asset="activations",
                blocking=True,
                description="Every block is complete, and a fresh forward pass over a few sampled images reproduces "
                "their stored rows (tolerance by dtype). One result per recording run: its layers share "
                "one store and one ViT pass.",
            )
        ],
        config=dg.ConfigMapping(config_fn=_to_store_op, config_schema=ActivationsRunConfig.to_config_schema()),
    )
    def activations(vit_checkpoint, image_source):
        jobs = activations_store(vit_checkpoint=vit_checkpoint, image_source=image_source)
        stored, checked = activations_verify(jobs.map(record_activations_part).collect())
        return {"activations": stored, f"activations_{CHECK}": checked}

    return activations


def _to_store_op(run_config: dict) -> dict:
    """The asset's flat run config goes to the op that plans the recording (it hands it on to the others)."""
    return {"activations_store": {"config": run_config}}


def _progress_logger(context: dg.OpExecutionContext):
    """Log progress about every tenth of the work (tqdm bars do not show in Dagster's UI)."""
    state = {"next": 0.0}

    def log(done: int, total: int) -> None:
        if total and done / total >= state["next"]:
            context.log.info(f"recorded {done}/{total} images")
            state["next"] = done / total + 0.1

    return log
