"""sae_sweep[layer]: the pipeline's whole [sweep] grid trained on one layer in one pass over its activations."""

import dagster as dg

from saev_dagster.assets.common import stage_asset_kwargs
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.metadata import latest_store_path, member_figures, png_markdown, table
from saev_dagster.resources import SaevPipeline

CHECK = "sweep_is_healthy"
PLOT = "plot: L0 vs NMSE (PNG)"
"""The one picture that must stay markdown (Dagster has no image metadata): its key says what the link shows."""
MEMBER_COLUMNS = [
    ("member_id", "string"),
    ("sae.arch", "string"),
    ("sae.exp_factor", "int"),
    ("sae.k", "int"),
    ("lr", "float"),
    ("nmse", "float"),
    ("l0", "float"),
    ("frac_dead_train", "float"),
    ("frac_dead_heldout", "float"),
    ("pca_nmse_at_l0", "float"),
    ("random_nmse_at_l0", "float"),
    ("gain_vs_pca", "float"),
    ("gain_vs_random", "float"),
]


def build_sae_sweep_asset(partitions_def: dg.PartitionsDefinition, code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="sae_sweep",
        partitions_def=partitions_def,
        deps=["activations"],
        check_specs=[
            dg.AssetCheckSpec(
                CHECK,
                asset="sae_sweep",
                blocking=True,
                partitions_def=partitions_def,  # one result per layer
                description="ERROR (blocks visuals and the report): a member with NaN/Inf metrics or every latent "
                "dead, or the best NMSE above [checks] max_nmse. WARN: more dead latents than [checks] max_frac_dead "
                "(dead: did not fire in the last --sae.dead-after-n-patches training vectors), or the best member "
                "losing to PCA or the random-decoder control at matched L0. The numbers are in its metadata.",
            )
        ],
        **stage_asset_kwargs("training", {"pytorch"}, code_version, gpu=True),
        description="Every SAE of the pipeline's [sweep], trained together from one pass over this layer.",
    )
    @user_errors_fail_cleanly
    def sae_sweep(context: dg.AssetExecutionContext, saev_pipeline: SaevPipeline) -> dg.MaterializeResult:
        from saev_core.pipeline import stages

        layer = int(context.partition_key)
        pipe = saev_pipeline.load()
        store_path = latest_store_path(context, context.partition_key)
        sweep = stages.train_layer(
            pipe,
            layer,
            store_path,
            show_progress=saev_pipeline.show_progress,
            on_log=_log_to(context),
            on_note=context.log.warning,
        )
        columns = [c for c in MEMBER_COLUMNS if c[0] in sweep.table]
        return dg.MaterializeResult(
            metadata={
                "members": table(sweep.table.to_dict("records"), columns),
                PLOT: png_markdown(sweep.l0_vs_nmse_png, "L0 vs NMSE"),
                "sweep_csv": dg.MetadataValue.path(sweep.csv_path),
                "store_path": dg.MetadataValue.path(store_path),
                "n_members": len(sweep.results),
                **member_figures(sweep.table),
            },
            check_results=[health_check_result(sweep.health)],
        )

    return sae_sweep


def health_check_result(health) -> dg.AssetCheckResult:
    """sweep_is_healthy with its numbers: ERROR (blocks what follows) for NaN/Inf metrics, an all-dead member or the
    best NMSE above [checks] max_nmse; WARN for more dead latents than [checks] max_frac_dead or a best member that
    loses to PCA or the random-decoder control at matched L0."""
    numbers = {k: v for k, v in health.numbers().items() if not (isinstance(v, float) and v != v)}
    lines = "\n".join(f"- {p}" for p in health.problems) or "none"
    return dg.AssetCheckResult(
        check_name=CHECK,
        passed=health.severity == "ok",
        severity=dg.AssetCheckSeverity.ERROR if health.severity == "error" else dg.AssetCheckSeverity.WARN,
        metadata={**numbers, "problems": dg.MetadataValue.md(lines)},
    )


def _log_to(context: dg.AssetExecutionContext):
    def log(step: int, member_id: str, record: dict) -> None:
        context.log.info(f"step {step} {member_id}: loss {record['loss']:.4g} l0 {record['l0']:.1f}")

    return log
