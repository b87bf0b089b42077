"""The command line: ``python -m saev_core activations|train|visuals|pipeline|evaluate|probe|explore``.

Flags keep the original saev's names. Bad input prints one error line that says what to fix and exits 2.
"""

import contextlib
import dataclasses
import logging
import os
import sys
from typing import Annotated

import tyro

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import atomic_write_bytes, write_error


@dataclasses.dataclass(frozen=True)
class RunPipeline:
    """Run every stage of a pipeline file (TOML): record its [activations], train its [sweep] on every layer,
    render top-k visuals of the members its [visuals] table chooses, and with a [probe] table fit their patch
    probes."""

    path: str | None = None
    """Pipeline file; None means $SAEV_PIPELINE, else the embedded demo pipeline."""


Command = (
    Annotated[config.ActivationsConfig, tyro.conf.subcommand("activations", prefix_name=False)]
    | Annotated[config.TrainConfig, tyro.conf.subcommand("train", prefix_name=False)]
    | Annotated[config.VisualsConfig, tyro.conf.subcommand("visuals", prefix_name=False)]
    | Annotated[RunPipeline, tyro.conf.subcommand("pipeline", prefix_name=False)]
    | Annotated[config.EvaluateConfig, tyro.conf.subcommand("evaluate", prefix_name=False)]
    | Annotated[config.ProbeConfig, tyro.conf.subcommand("probe", prefix_name=False)]
    | Annotated[config.ExploreConfig, tyro.conf.subcommand("explore", prefix_name=False)]
)


def run_activations(cfg: config.ActivationsConfig) -> str:
    from saev_core.record import recording

    if cfg.dry_run:
        plan = recording.dry_run(cfg)
        print(
            f"would write {plan.nbytes / 1e9:.3f} GB ({len(cfg.vit_layers)} layers x "
            f"{plan.metadata.n_imgs} images x {plan.metadata.n_tokens} tokens x {plan.metadata.d_vit} x {cfg.dtype}); "
            f"recording holds up to 3 blocks of {plan.block_bytes / 1e6:.1f} MB in memory; the disk has room."
        )
        return plan.path
    result = recording.record_activations(cfg)
    print(
        f"recorded {result.n_imgs_written} images in {result.seconds:.1f} s ({result.imgs_per_s:.1f} img/s), "
        f"{result.bytes_written / 1e6:.1f} MB, {result.n_skipped} skipped; store shape {result.shape} per layer",
        file=sys.stderr,
    )
    return result.path


def run_visuals(cfg: config.VisualsConfig) -> str:
    from saev_core.visuals import render

    result = render.make_visuals(cfg)
    print(
        f"rendered {result.n_heatmaps} heatmaps for {len(result.latents)} latents ({result.n_alive} of {result.d_sae} "
        f"latents fire); top-k cache {'reused' if result.cache_reused else 'computed'}",
        file=sys.stderr,
    )
    return result.index_html


def run_train(cfg: config.TrainConfig) -> str:
    from saev_core.train import results, trainer

    report_members(trainer.train_main(cfg))
    return results.sweep_csv_path(cfg.ckpt_path)


def report_members(results) -> None:
    for result in results:
        m = result.metrics
        print(
            f"{result.member_id}: {result.cfg.sae.arch} d_sae={result.cfg.sae.d_sae} lr={result.cfg.lr:g} "
            f"NMSE={m['nmse']:.4f} L0={m['l0']:.1f} dead={m['frac_dead_train']:.1%} "
            f"(held-out {m['frac_dead_heldout']:.1%}) -> {result.ckpt_path}"
        )


def stage_line(label: str, seconds: float, figure: str) -> None:
    """The pipeline's one line per stage: what ran, how long it took, its key figure."""
    print(f"{label:<20} {seconds:6.1f} s  {figure}", flush=True)


def run_pipeline(cmd: RunPipeline) -> str:
    """Every stage of the pipeline file, one line each (progress bars and warnings on stderr; INFO logs are off)."""
    import time

    from saev_core.nn import metrics
    from saev_core.pipeline import file as pipeline_file
    from saev_core.pipeline import stages
    from saev_core.record import recording

    logging.getLogger().setLevel(logging.WARNING)
    pipe = pipeline_file.load_pipeline(cmd.path)
    stages.prepare_demo_checkpoint(pipe)
    start = time.monotonic()
    rec = recording.record_activations(pipe.activations)
    figure = (
        f"{rec.bytes_written / 1e6:.1f} MB at {rec.imgs_per_s:.1f} img/s"
        if rec.n_imgs_written
        else "complete store reused"
    )
    stage_line(f"activations[{', '.join(map(str, rec.layers))}]", time.monotonic() - start, f"{figure}: {rec.path}")
    csvs = {}
    for layer in pipe.activations.vit_layers:
        start = time.monotonic()
        sweep = stages.train_layer(pipe, layer, rec.path)
        csvs[layer] = sweep.csv_path
        png = os.path.join(os.path.dirname(sweep.csv_path), "l0_vs_nmse.png")
        atomic_write_bytes(png, sweep.l0_vs_nmse_png)
        best = metrics.best_member(sweep.table.to_dict("records"))
        figure = (
            f"lowest NMSE {best['nmse']:.4f} at L0 {best['l0']:.1f} ({best['member_id']})" if best else "no finite NMSE"
        )
        stage_line(f"sae_sweep[{layer}]", time.monotonic() - start, f"{len(sweep.results)} members; {figure}")
        print(f"  sweep: {sweep.csv_path}\n  plot: {png}")
        for problem in sweep.health.errors:
            print(f"error: layer {layer}: {problem}", file=sys.stderr)
        for problem in sweep.health.warnings:
            print(f"warning: layer {layer}: {problem}", file=sys.stderr)
        if pipe.probe is not None:  # before the visuals: their galleries show the probes
            start = time.monotonic()
            probed = stages.probes_for_layer(pipe, layer, sweep.csv_path)
            if probed.note:
                print(f"warning: layer {layer}: {probed.note}", file=sys.stderr)
            maps = ", ".join(f"mAP {result.sae.map:.3f} ({member})" for member, result in probed.members)
            stage_line(f"probe_metrics[{layer}]", time.monotonic() - start, maps or "no patch labels")
            for _, result in probed.members:
                print(f"  probes: {result.path}")
        start = time.monotonic()
        members = stages.visuals_for_layer(pipe, layer, sweep.csv_path)
        n_latents = sum(len(m.result.latents) for m in members)
        stage_line(
            f"topk_visuals[{layer}]", time.monotonic() - start, f"{n_latents} latents of {len(members)} member(s)"
        )
        for member in members:
            print(f"  gallery ({member.member_id}): {member.result.index_html}")
    start = time.monotonic()
    report_path, reports = stages.sweep_report(pipe, csvs)
    found = sum("**Structure found**" in line for rep in reports for line in rep.verdict)
    stage_line("sweep_report", time.monotonic() - start, f"structure found in {found} of {len(reports)} layers")
    print(f"  report: {report_path}")
    return pipe.train.ckpt_path


def run_evaluate(cfg: config.EvaluateConfig) -> str:
    """Print the splice-in fidelity of one checkpoint; the last line is the result as JSON."""
    import json

    from saev_core.analysis import splice

    [result] = splice.evaluate_checkpoints([cfg.ckpt], cfg.device, cfg.max_images, cfg.batch_size, cfg.images_root)
    print(f"splice-in fidelity of {cfg.ckpt}: {result.line()}")
    return json.dumps(dataclasses.asdict(result))


def run_probe(cfg: config.ProbeConfig) -> str:
    """Print mAP, Coverage and Purity@k of the SAE and each control; the last line is probe.json's path."""
    from saev_core.analysis import probe_run

    result = probe_run.run_probes(cfg)
    for m in [result.sae, *result.controls.values()]:
        print(
            f"{m.name}: mAP={m.map:.3f} coverage@{m.tau:g}={m.coverage:.3f} purity@{m.k}={m.purity_at_k:.3f} "
            f"({m.width} latents)",
            file=sys.stderr,
        )
    return result.path


def run_explore(cfg: config.ExploreConfig) -> str:
    from saev_core import explorer

    return explorer.serve(cfg)


def os_error_line(err: OSError) -> str:
    """One line for an OSError: the file it names, what the system said, what to check."""
    if getattr(err, "filename", None):
        return str(write_error(err.filename, err, action="use"))
    return f"{err.strerror or err}. Check the paths given on the command line or in the pipeline file."


KEPT_WHEN_INTERRUPTED = {
    config.ActivationsConfig: "every complete block is kept; run the same command again to record only the others",
    config.TrainConfig: "finished members and each group's last checkpoint (every --ckpt-every steps) are kept; run "
    "the same command again to resume from there",
    config.VisualsConfig: "the top-k cache, once written, and the rendered latents are kept; run the same command "
    "again to finish",
    config.EvaluateConfig: "evaluate writes nothing; run it again",
    config.ProbeConfig: "probe.json is written only at the end; run the same command again",
}
"""Ctrl-C's one line per command: what is kept and how to go on (pipeline: every stage keeps what its command does)."""


def interrupted_line(cmd: object) -> str:
    kept = KEPT_WHEN_INTERRUPTED.get(type(cmd))
    if kept is None:  # the pipeline, or interrupted while parsing
        kept = "what each finished stage wrote is kept; run the same command again to continue"
    return f"interrupted: {kept}."


def _one_line_value_errors():
    """While tyro parses: a flag whose value cannot be converted (``--top-k 1e9`` for a whole number) or is not one
    of its choices becomes a UserError (one line) instead of tyro's box. Uses tyro's parse-error hook, which tyro
    marks unstable: when it is missing, tyro's own box is shown (still exit 2, no traceback)."""
    try:
        from tyro._errors import InstantiationFailure, InvalidChoice, on_parse_error
    except ImportError:
        return contextlib.nullcontext()

    def hook(event):
        argument = getattr(event, "argument", None)
        if argument is None:
            return None
        flag = "/".join(argument.lowered.name_or_flags) or str(argument.lowered.metavar)
        if isinstance(event, InstantiationFailure):
            kind = argument.lowered.metavar or "a value"
            raise UserError(f"{flag}: {event.message} (expected {kind}). See `{event.prog} --help`.")
        if isinstance(event, InvalidChoice):
            raise UserError(f"{flag} {event.value!r}: expected one of {', '.join(event.choices)}.")
        return None

    return on_parse_error(hook)


def main(argv: list[str] | None = None) -> int:
    """Parse argv (sys.argv[1:] when None), run the command, print its main result last on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cmd = None
    try:
        with _one_line_value_errors():
            cmd = tyro.cli(
                Command,
                args=argv,
                prog="python -m saev_core",
                config=(tyro.conf.CascadeSubcommandArgs,),
                description=(
                    "Record ViT activations to a zarr store, train sparse autoencoders on them, and look at their "
                    "latents."
                ),
            )
        if isinstance(cmd, config.ActivationsConfig):
            out = run_activations(cmd)
        elif isinstance(cmd, config.TrainConfig):
            out = run_train(cmd)
        elif isinstance(cmd, config.VisualsConfig):
            out = run_visuals(cmd)
        elif isinstance(cmd, config.EvaluateConfig):
            out = run_evaluate(cmd)
        elif isinstance(cmd, config.ProbeConfig):
            out = run_probe(cmd)
        elif isinstance(cmd, config.ExploreConfig):
            out = run_explore(cmd)
        else:
            out = run_pipeline(cmd)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file-system failure no module turned into a UserError: still one line, no traceback
        print(f"error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every job writes atomically and resumes, so say so instead of a traceback
        print(interrupted_line(cmd), file=sys.stderr)
        return 130
    print(out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
