"""The main job through Dagster: materialize the whole graph of a pipeline file (default: the embedded demo) in
dependency order, as runs of the workspace's code location, so the UI shows this history afterwards.

    python -m saev_dagster.demo [--pipeline FILE] [--dagster-home DIR]

The sources are observed first (no run: the observation sensor's own step), then `activations` records every layer
in one run, then each layer's `sae_sweep` and `topk_visuals` (with their checks), then `sweep_report`; with a
[watch] folder, one of the sweep's own checkpoints is dropped there and its `dropped_sae_visuals` rendered. Every run
is launched through `workspace.yaml`'s code location (`saev_dagster.launch`), as the UI launches it.

The terminal gets one line per stage (its time and key figure) and the steps' progress bars; Dagster's event log
stays in the instance (the UI) and, at INFO, in a log file whose path is printed with the command that opens the UI.
"""

import argparse
import os
import sys
import time

import dagster as dg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKSPACE = os.path.join(REPO, "workspace.yaml")
LOG_FILE = "demo_event_log.txt"
ASSET_JOB = "__ASSET_JOB"
"""Dagster's implicit job of every asset: what the UI launches for an asset outside the explicit jobs."""


def run_config() -> dict:
    """Every demo run's config: the console logger shows errors only (everything is in the UI and the log file;
    saev_core's own warnings still print, once), the steps draw progress bars, and with Dagster's default executor
    the steps run in the run's own process (the multiprocess default starts a Python process per step: seconds
    each, for no parallelism on the demo's one recording op)."""
    config = {
        "loggers": {"console": {"config": {"log_level": "ERROR"}}},
        "resources": {"saev_pipeline": {"config": {"show_progress": True}}},
    }
    if os.environ.get("SAEV_DAGSTER_EXECUTOR", "multiprocess") == "multiprocess":
        config["execution"] = {"config": {"in_process": {}}}
    return config


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


class StageFailed(Exception):
    """A run failed; the message names the stage and the step's error."""


class Demo:
    """The demo's runs and its terminal: one line per stage."""

    def __init__(self, workspace, log_path: str, say=print):
        self.workspace, self.log_path, self.say = workspace, log_path, say
        self.instance = workspace.instance

    def stage(self, label: str, job: str, assets: list[str], tags: dict | None = None) -> tuple[float, dict]:
        """Launch one run through the code location and wait for it: (its seconds, asset -> (its step's seconds,
        its metadata values))."""
        from saev_dagster.launch import append_event_log, materializations, step_failures, step_seconds

        start = time.monotonic()
        run = self.workspace.launch(job, assets, tags, run_config())
        run = self.workspace.wait(run.run_id)
        append_event_log(self.instance, run.run_id, self.log_path)
        if not run.is_success:
            failed = step_failures(self.instance, run.run_id)
            raise StageFailed(f"{label} failed (run {run.run_id}): {failed[-1] if failed else 'see the run in the UI'}")
        steps = step_seconds(self.instance, run.run_id)
        seconds = time.monotonic() - start
        by_asset = {}
        for mat in materializations(self.instance, run.run_id):
            name = mat.asset_key.to_user_string()
            values = {k: v.value for k, v in mat.metadata.items()}
            by_asset[name] = (steps.get(name, seconds), values)
        return seconds, by_asset

    def line(self, seconds: float, label: str, figure: str) -> None:
        self.say(f"{label:<20} {seconds:6.1f} s  {figure}")


def run(pipeline_path: str | None, home: str, say=print) -> None:
    """Materialize everything, printing one line per stage."""
    from saev_core.pipeline import file as pipeline_file
    from saev_dagster.definitions import LAYER_JOB, REPORT_JOB, build_definitions
    from saev_dagster.launch import Workspace
    from saev_dagster.observation import observe_sources

    os.environ["DAGSTER_HOME"] = dagster_home(home)
    if pipeline_path:  # the code server that the workspace starts reads the same file
        os.environ["SAEV_PIPELINE"] = os.path.abspath(pipeline_path)
    instance = dg.DagsterInstance.get()
    defs = build_definitions(pipeline_path)
    pipe = pipeline_file.load_pipeline(pipeline_path)
    layers = defs.resolve_assets_def("activations").partitions_def.get_partition_keys()

    if pipe.watch.folder:  # the demo drops one of its checkpoints there at the end
        os.makedirs(pipe.watch.folder, exist_ok=True)
    start = time.monotonic()
    observed = observe_sources(defs, instance)
    changed = ", ".join(e.asset_key.to_user_string() for e in observed) or "nothing"
    say(f"{'sources':<20} {time.monotonic() - start:6.1f} s  observed without a run; new data versions: {changed}")

    with Workspace(instance, WORKSPACE) as workspace:
        demo = Demo(workspace, os.path.join(os.environ["DAGSTER_HOME"], LOG_FILE), say)
        tags = {"dagster/asset_partition_range_start": layers[0], "dagster/asset_partition_range_end": layers[-1]}
        seconds, by_asset = demo.stage("activations", LAYER_JOB, ["activations"], tags)
        demo.line(seconds, f"activations[{', '.join(layers)}]", recording_figure(by_asset["activations"][1]))

        sweeps = {}
        per_layer = ["sae_sweep", *(["probe_metrics"] if pipe.probe else []), "topk_visuals"]
        for layer in layers:  # one run per layer: the sweep, its probes and its visuals
            seconds, by_asset = demo.stage(f"layer {layer}", LAYER_JOB, per_layer, {"dagster/partition": layer})
            meta = by_asset["sae_sweep"][1]
            sweeps[layer] = meta
            demo.line(
                by_asset["sae_sweep"][0],
                f"sae_sweep[{layer}]",
                f"{meta['n_members']} members; lowest NMSE {meta['best_nmse']:.4f} at L0 {meta['best_l0']:.1f} "
                f"({meta['best_member']})",
            )
            if "probe_metrics" in by_asset:
                seconds, meta = by_asset["probe_metrics"]
                figure = (
                    f"patch probes mAP {meta['map']:.3f}, coverage {meta['coverage']:.0%}"
                    if "map" in meta
                    else meta.get("note", "no probes")
                )
                demo.line(seconds, f"probe_metrics[{layer}]", figure)
            seconds, meta = by_asset["topk_visuals"]
            demo.line(
                seconds, f"topk_visuals[{layer}]", f"{meta['n_latents']} latents of {meta['n_members']} member(s)"
            )
            for key, value in meta.items():
                if key.startswith("gallery/"):
                    say(f"  gallery ({key.split('/', 1)[1]}): {value}")
            for key, value in meta.items():
                if key.startswith("explore/"):
                    say(f"  explorer app ({key.split('/', 1)[1]}): {sys.executable} -m {value.split(' -m ', 1)[1]}")

        seconds, by_asset = demo.stage("sweep_report", REPORT_JOB, ["sweep_report"])
        meta = by_asset["sweep_report"][1]
        found = sum("**Structure found**" in v for k, v in meta.items() if k.startswith("verdict_layer_"))
        demo.line(
            seconds, "sweep_report", f"structure found in {found} of {len(layers)} layers; report: {meta['report']}"
        )

        if pipe.watch.folder:
            drop_own_checkpoint(demo, defs, pipe, layers[-1], sweeps[layers[-1]])

    env = f"DAGSTER_HOME={os.environ['DAGSTER_HOME']}"
    if pipeline_path:
        env += f" SAEV_PIPELINE={os.path.abspath(pipeline_path)}"
    say(f"Dagster's event log: the UI, and at INFO {os.path.join(os.environ['DAGSTER_HOME'], LOG_FILE)}")
    say(f"UI: {env} {os.path.dirname(sys.executable)}/dagster dev -w {WORKSPACE} -h 127.0.0.1 -p 3000")


def recording_figure(meta: dict) -> str:
    """The activations stage's key figure: what was written and how fast, or that the store was reused."""
    store = meta["store_path"]
    if meta["reused_existing_store"]:
        return f"complete store reused: {store}"
    return f"{meta['mb_written']:.1f} MB at {meta['imgs_per_s']:.1f} img/s: {store}"


def drop_own_checkpoint(demo: Demo, defs, pipe, layer: str, sweep: dict) -> None:
    """Copy one of a layer's checkpoints (one without visuals yet: not the best) into the [watch] folder, observe
    it, and render its dropped_sae_visuals, as a user dropping an SAE file gets them (a copy that is already there
    is left alone, so a second demo finds nothing new)."""
    import filecmp

    from saev_core.files import atomic_write_bytes
    from saev_core.train import results
    from saev_dagster.observation import observe_sources

    rows = results.read_sweep_csv(sweep["sweep_csv"]).to_dict("records")
    row = next((r for r in rows if r["member_id"] != sweep["best_member"]), rows[0])
    name = f"layer_{layer}_{row['member_id']}.pt"
    target = os.path.join(pipe.watch.folder, name)
    if not (os.path.exists(target) and filecmp.cmp(target, row["ckpt"], shallow=False)):
        with open(row["ckpt"], "rb") as f:
            atomic_write_bytes(target, f.read())  # the folder never shows half a file
    start = time.monotonic()
    observe_sources(defs, demo.instance)
    _, by_asset = demo.stage(
        f"dropped_sae_visuals[{name}]", ASSET_JOB, ["dropped_sae_visuals"], {"dagster/partition": name}
    )
    gallery = by_asset["dropped_sae_visuals"][1]["gallery"]
    demo.line(time.monotonic() - start, "dropped_sae_visuals", f"{target} -> gallery {gallery}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saev_dagster.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="pipeline file (default: $SAEV_PIPELINE, else the demo)")
    parser.add_argument("--dagster-home", default="runs/demo/dagster_home", help="the Dagster instance folder")
    args = parser.parse_args(argv)
    from saev_dagster.definitions import PipelineFileError
    from saev_dagster.launch import CodeLocationError

    try:
        run(args.pipeline, args.dagster_home, say=lambda line: print(line, flush=True))
    except (PipelineFileError, CodeLocationError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
