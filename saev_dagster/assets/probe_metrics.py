"""probe_metrics[layer]: patch probes (mAP, Coverage, Purity@k; docs/probes.md) of the sweep members the pipeline's
[probe] table chooses, beside the same metrics of the controls. Defined only when the pipeline has a [probe] table;
a store without per-patch labels gives a materialization with a note, not a failure."""

import math

import dagster as dg

from saev_dagster.assets.common import stage_asset_kwargs
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.metadata import latest_materialization_value
from saev_dagster.resources import SaevPipeline


def build_probe_metrics_asset(partitions_def: dg.PartitionsDefinition, code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="probe_metrics",
        partitions_def=partitions_def,
        deps=["sae_sweep"],
        **stage_asset_kwargs("probes", {"pytorch", "json"}, code_version, gpu=True),
        description="For each chosen sweep member: per class, the latent whose 1-D probe fits its patches best; "
        "held-out AP, mAP, Purity@k and Coverage, beside PCA, random-decoder and k-means controls.",
    )
    @user_errors_fail_cleanly
    def probe_metrics(context: dg.AssetExecutionContext, saev_pipeline: SaevPipeline) -> dg.MaterializeResult:
        from saev_core.pipeline import stages

        sweep_csv = latest_materialization_value(context, "sae_sweep", context.partition_key, "sweep_csv")
        layer = stages.probes_for_layer(saev_pipeline.load(), int(context.partition_key), sweep_csv, False)
        if layer.note:
            context.log.warning(layer.note)
            return dg.MaterializeResult(metadata={"note": layer.note, "n_members": 0})
        metadata: dict = {"n_members": len(layer.members)}
        for i, (member_id, result) in enumerate(layer.members):
            for m in [result.sae, *result.controls.values()]:
                prefix = member_id if m is result.sae else f"{member_id}_{m.name}"
                metadata[f"map_{prefix}"] = _number(m.map)
                metadata[f"coverage_{prefix}"] = _number(m.coverage)
            metadata[f"probe_json_{member_id}"] = dg.MetadataValue.path(result.path)
            if i == 0:  # the first chosen member's numbers, under fixed names for plots across runs
                metadata["map"] = _number(result.sae.map)
                metadata["coverage"] = _number(result.sae.coverage)
                metadata["purity_at_k"] = _number(result.sae.purity_at_k)
            context.log.info(f"{member_id}: mAP {result.sae.map:.3f} coverage {result.sae.coverage:.3f}")
        return dg.MaterializeResult(metadata=metadata)

    return probe_metrics


def _number(value: float) -> dg.MetadataValue:
    """A float metadata value; NaN (no class could be evaluated) as text, which Dagster's plots skip."""
    return dg.MetadataValue.float(value) if math.isfinite(value) else dg.MetadataValue.text("nan")
