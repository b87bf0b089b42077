"""The main job through Dagster: materialize the whole graph of a pipeline file (default: the embedded demo) in
dependency order, with a persistent instance so the UI shows this history afterwards.

    python -m saev_dagster.demo [--pipeline FILE] [--dagster-home DIR]

Sources are observed first (so fresh assets are not shown as unsynced), then `activations` records every layer in
one run, then each layer's `sae_sweep` and `topk_visuals` (with their checks), then `sweep_report`. It prints where
the galleries and the report are, and the command that opens the UI on 127.0.0.1.
"""

import argparse
import os
import sys

import dagster as dg


def dagster_home(path: str) -> str:
    """An instance folder with telemetry and the UI's welcome dialog off (created once; an existing dagster.yaml is
    kept)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    config = os.path.join(path, "dagster.yaml")
    if not os.path.exists(config):
        with open(config, "w") as f:
            f.write("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    return path


def run(pipeline_path: str | None, home: str) -> list[str]:
    """Materialize everything; returns the lines to print (galleries, report)."""
    from saev_dagster.assets.sources import observe_sources
    from saev_dagster.definitions import LAYER_JOB, REPORT_JOB, build_definitions

    os.environ["DAGSTER_HOME"] = dagster_home(home)
    instance = dg.DagsterInstance.get()
    defs = build_definitions(pipeline_path)
    layers = defs.resolve_assets_def("activations").partitions_def.get_partition_keys()

    def step(selection: list[str], **kwargs) -> dg.ExecuteInProcessResult:
        job = defs.resolve_job_def(REPORT_JOB if selection == ["sweep_report"] else LAYER_JOB)
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(k) for k in selection], raise_on_error=False, **kwargs
        )
        if not result.success:
            failed = [e.step_failure_data.error.message.strip() for e in result.all_events if e.is_step_failure]
            raise SystemExit(
                f"error: materializing {selection} {kwargs.get('partition_key', '')} failed: "
                f"{failed[-1] if failed else 'see the run in the UI'}"
            )
        return result

    observe_sources(defs, instance)
    step(
        ["activations"],
        tags={"dagster/asset_partition_range_start": layers[0], "dagster/asset_partition_range_end": layers[-1]},
    )
    lines = []
    for layer in layers:
        step(["sae_sweep"], partition_key=layer)
        visuals = step(["topk_visuals"], partition_key=layer)
        for mat in visuals.asset_materializations_for_node("topk_visuals"):
            lines += [
                f"gallery (layer {layer}): {v.value}" for k, v in mat.metadata.items() if k.startswith("gallery_")
            ]
            lines += [
                f"explorer app (layer {layer}): {sys.executable} -m {v.value.split(' -m ', 1)[1]}"
                for k, v in mat.metadata.items()
                if k.startswith("explore_")
            ]
    report = step(["sweep_report"])
    (mat,) = report.asset_materializations_for_node("sweep_report")
    lines.append(f"report: {mat.metadata['report'].value}")
    workspace = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workspace.yaml")
    pipeline_env = f"SAEV_PIPELINE={os.path.abspath(pipeline_path)} " if pipeline_path else ""
    lines.append(
        f"UI: {pipeline_env}DAGSTER_HOME={os.environ['DAGSTER_HOME']} {os.path.dirname(sys.executable)}"
        f"/dagster dev -w {workspace} -h 127.0.0.1 -p 3000"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saev_dagster.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="pipeline file (default: $SAEV_PIPELINE, else the demo)")
    parser.add_argument("--dagster-home", default="runs/demo/dagster_home", help="the Dagster instance folder")
    args = parser.parse_args(argv)
    from saev_dagster.definitions import PipelineFileError

    try:
        lines = run(args.pipeline, args.dagster_home)
    except PipelineFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
