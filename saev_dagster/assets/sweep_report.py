"""sweep_report: every member of every layer in one table, the chosen member per layer, L0-vs-NMSE plots with a
PCA baseline at matched L0; inline here and written as report.md + PNGs beside the checkpoints."""

import dagster as dg

from saev_dagster.assets.common import stage_asset_kwargs
from saev_dagster.failures import user_errors_fail_cleanly
from saev_dagster.metadata import latest_values, png_markdown, table
from saev_dagster.resources import SaevPipeline

COLUMNS = [
    ("layer", "int"),
    ("member_id", "string"),
    ("sae.arch", "string"),
    ("sae.k", "int"),
    ("lr", "float"),
    ("nmse", "float"),
    ("pca_nmse_at_l0", "float"),
    ("random_nmse_at_l0", "float"),
    ("kmeans_nmse", "float"),
    ("gain_vs_pca", "float"),
    ("gain_vs_random", "float"),
    ("l0", "float"),
    ("frac_dead_train", "float"),
    ("map", "float"),
    ("coverage", "float"),
    ("pca_map", "float"),
    ("random_map", "float"),
    ("splice_cos", "float"),
    ("splice_gap_recovered", "float"),
    ("chosen", "bool"),
]


def build_sweep_report_asset(layers: list[str], code_version: str, probes: bool = False) -> dg.AssetsDefinition:
    @dg.asset(
        name="sweep_report",
        deps=["sae_sweep", "topk_visuals", *(["probe_metrics"] if probes else [])],
        **stage_asset_kwargs("report", {"pandas", "markdown"}, code_version),
        description="A verdict per layer in plain words, every sweep member of every layer beside its controls (PCA "
        "and the random-decoder control at matched L0, k-means), the chosen member per layer ([report] rule), and "
        "L0-vs-NMSE plots with the PCA curve.",
    )
    @user_errors_fail_cleanly
    def sweep_report(context: dg.AssetExecutionContext, saev_pipeline: SaevPipeline) -> dg.MaterializeResult:
        from saev_core.analysis import report
        from saev_core.pipeline import stages

        csvs = {int(k): v for k, v in latest_values(context, "sae_sweep", layers, "sweep_csv").items()}
        if not csvs:
            raise dg.Failure(description="No layer's sae_sweep has been materialized yet; materialize sae_sweep first.")
        path, reports = stages.sweep_report(saev_pipeline.load(), csvs)
        rows = report.member_rows(reports)
        metadata = {
            "members": table(rows, [c for c in COLUMNS if any(c[0] in r for r in rows)]),
            "report": dg.MetadataValue.path(path),
            "layers": str(sorted(csvs)),
        }
        for rep in reports:
            metadata[f"verdict_layer_{rep.layer}"] = dg.MetadataValue.md("\n\n".join(rep.verdict + rep.notes))
            metadata[f"l0_vs_nmse_layer_{rep.layer}"] = png_markdown(rep.png, f"layer {rep.layer}")
            if rep.chosen:
                metadata[f"chosen_layer_{rep.layer}"] = rep.chosen["member_id"]
                for column in ("nmse", "l0", "gain_vs_pca", "gain_vs_random"):
                    value = rep.chosen.get(column)
                    if isinstance(value, float) and value == value:
                        metadata[f"chosen_{column}_layer_{rep.layer}"] = value
        return dg.MaterializeResult(metadata=metadata)

    return sweep_report
