"""sweep_report: every member of every layer in one table, the chosen member per layer, L0-vs-NMSE plots with a
PCA baseline at matched L0; inline here and written as report.md + PNGs beside the checkpoints."""

import dagster as dg

from saev_dagster.metadata import png_markdown, table
from saev_dagster.resources import SaevPipeline, fail_clearly

COLUMNS = [("layer", "int"), ("member_id", "string"), ("sae.arch", "string"), ("sae.k", "int"), ("lr", "float"),
           ("nmse", "float"), ("pca_nmse_at_l0", "float"), ("l0", "float"), ("frac_dead_train", "float"),
           ("chosen", "bool")]


def build_sweep_report_asset(layers: list[str], code_version: str) -> dg.AssetsDefinition:
    @dg.asset(
        name="sweep_report",
        deps=["sae_sweep", "topk_visuals"],
        automation_condition=dg.AutomationCondition.eager(),
        group_name="report",
        kinds={"pandas", "markdown"},
        tags={"stage": "report"},
        owners=["team:saev"],
        code_version=code_version,
        description="Every sweep member of every layer, the chosen member per layer ([report] rule), and L0-vs-NMSE "
                    "plots with a PCA baseline at matched L0.",
    )
    def sweep_report(context: dg.AssetExecutionContext, saev_pipeline: SaevPipeline) -> dg.MaterializeResult:
        import math

        from saev_core import pipeline

        pipe = saev_pipeline.load()
        csvs = {}
        for key in layers:
            records = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("sae_sweep"), asset_partitions=[key]), limit=1).records
            if records:
                csvs[int(key)] = records[0].asset_materialization.metadata["sweep_csv"].value
        if not csvs:
            raise dg.Failure(description="No layer's sae_sweep has been materialized yet; materialize sae_sweep first.")
        path, reports = fail_clearly(pipeline.sweep_report, pipe, csvs)
        rows = []
        for rep in reports:
            chosen = rep.chosen["member_id"] if rep.chosen else None
            for row in rep.table.to_dict("records"):
                rows.append({**{k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))},
                             "layer": rep.layer, "chosen": row["member_id"] == chosen})
        metadata = {
            "members": table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)]),
            "report": dg.MetadataValue.path(path),
            "layers": str(sorted(csvs)),
        }
        for rep in reports:
            metadata[f"l0_vs_nmse_layer_{rep.layer}"] = png_markdown(rep.png, f"layer {rep.layer}")
            if rep.chosen:
                metadata[f"chosen_layer_{rep.layer}"] = rep.chosen["member_id"]
        return dg.MaterializeResult(metadata=metadata)

    return sweep_report
