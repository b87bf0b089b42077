"""sae_sweep[layer]: the pipeline's whole [sweep] grid trained on one layer in one pass over its activations."""

import dagster as dg

from saev_dagster.config import PipelineRunConfig
from saev_dagster.metadata import latest_store_path, png_markdown

CHECK = "sweep_is_healthy"


def build_sae_sweep_asset(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="sae_sweep",
        partitions_def=partitions_def,
        deps=["activations"],
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[dg.AssetCheckSpec(
            CHECK, asset="sae_sweep", blocking=True,
            description="No member has NaN metrics, and none has more dead latents than [checks] max_frac_dead.",
        )],
        kinds={"pytorch"},
        description="Every SAE of the pipeline's [sweep], trained together from one pass over this layer.",
    )
    def sae_sweep(context: dg.AssetExecutionContext, config: PipelineRunConfig) -> dg.MaterializeResult:
        from saev_core import pipeline
        from saev_core.errors import UserError

        layer = int(context.partition_key)
        try:
            pipe = pipeline.load_pipeline(config.pipeline or None)
            store_path = latest_store_path(context, context.partition_key)
            sweep = pipeline.train_layer(pipe, layer, store_path, show_progress=False, on_log=_log_to(context))
        except UserError as err:
            raise dg.Failure(description=str(err)) from None
        table, problems = sweep.table, sweep.problems
        shown = ["member_id", "sae.arch", "sae.exp_factor", "sae.k", "lr", "nmse", "l0", "frac_dead"]
        return dg.MaterializeResult(
            metadata={
                "members": dg.MetadataValue.md(table[[c for c in shown if c in table]].to_markdown(index=False)),
                "l0_vs_nmse": png_markdown(sweep.l0_vs_nmse_png, "L0 vs NMSE"),
                "sweep_csv": dg.MetadataValue.path(sweep.csv_path),
                "n_members": len(sweep.results),
                "best_nmse": float(table["nmse"].min()),
            },
            check_results=[dg.AssetCheckResult(
                check_name=CHECK, passed=not problems,
                metadata={"problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "none")},
            )],
        )

    return sae_sweep


def _log_to(context: dg.AssetExecutionContext):
    def log(step: int, member_id: str, record: dict) -> None:
        context.log.info(f"step {step} {member_id}: loss {record['loss']:.4g} l0 {record['l0']:.1f}")

    return log
