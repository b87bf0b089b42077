"""topk_visuals[layer]: top-k heatmaps and a gallery page for the sweep members the pipeline's [visuals] chooses."""

import dagster as dg

from saev_dagster.assets.common import stage_asset_kwargs
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.metadata import latest_materialization_value, png_markdown
from saev_dagster.resources import SaevPipeline

CHECK = "visuals_complete"


def build_topk_visuals_asset(
    partitions_def: dg.PartitionsDefinition, code_version: str, probes: bool = False
) -> dg.AssetsDefinition:
    """``probes``: the pipeline has [probe]; the gallery then follows probe_metrics, whose probe.json it shows."""

    @dg.asset(
        name="topk_visuals",
        partitions_def=partitions_def,
        deps=["sae_sweep", *(["probe_metrics"] if probes else [])],
        **stage_asset_kwargs("visuals", {"pytorch", "html"}, code_version, gpu=True),
        description="For each chosen sweep member: every selected latent's top images as heatmaps, and a gallery.",
    )
    @user_errors_fail_cleanly
    def topk_visuals(context: dg.AssetExecutionContext, saev_pipeline: SaevPipeline) -> dg.MaterializeResult:
        from saev_core.pipeline import stages
        from saev_core.visuals import gallery

        layer = int(context.partition_key)
        pipe = saev_pipeline.load()
        sweep_csv = latest_materialization_value(context, "sae_sweep", context.partition_key, "sweep_csv")
        members = stages.visuals_for_layer(pipe, layer, sweep_csv, show_progress=saev_pipeline.show_progress)
        metadata = {
            "n_members": len(members),
            "n_latents": sum(len(m.result.latents) for m in members),
            "n_heatmaps": sum(m.result.n_heatmaps for m in members),
        }
        for m in members:
            metadata[f"gallery/{m.member_id}"] = dg.MetadataValue.path(m.result.index_html)
            metadata[f"preview: top images of 4 latents, {m.member_id} (PNG)"] = png_markdown(
                gallery.preview_grid(m.result.dump_to, m.result.latents[:4], 6), f"top images of {m.member_id}"
            )
            metadata[f"explore/{m.member_id}"] = (
                f"python -m saev_core explore --visuals {m.result.dump_to} --sweep {sweep_csv.rsplit('/', 1)[0]}"
            )
            context.log.info(f"{m.member_id}: {len(m.result.latents)} latents -> {m.result.index_html}")
        return dg.MaterializeResult(metadata=metadata)

    return topk_visuals


def build_topk_visuals_check(partitions_def: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset="topk_visuals",
        name=CHECK,
        blocking=True,
        partitions_def=partitions_def,
        description="Every selected latent of every chosen member has all its heatmaps and metadata on disk.",
    )
    @user_errors_fail_cleanly
    def visuals_complete(context: dg.AssetCheckExecutionContext, saev_pipeline: SaevPipeline) -> dg.AssetCheckResult:
        from saev_core.pipeline import stages

        problems = stages.layer_visuals_problems(saev_pipeline.load(), int(context.partition_key))
        shown = "\n".join(f"- {p}" for p in problems[:50]) + (
            f"\n- ... {len(problems) - 50} more" if len(problems) > 50 else ""
        )
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={
                "n_problems": len(problems),
                "problems": dg.MetadataValue.md(shown or "none"),
            },
        )

    return visuals_complete
