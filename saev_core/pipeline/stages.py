"""The pipeline's stages: train a layer's sweep, render the chosen members' visuals, write the report, render a
dropped SAE file, make the demo's random weights, fit the chosen members' patch probes. The CLI's ``pipeline``
command and the Dagster assets both call these, so a stage is written once."""

import dataclasses
import os
import typing

import pandas as pd

from saev_core import config, files
from saev_core.analysis import controls, plots, report
from saev_core.errors import UserError
from saev_core.nn import metrics
from saev_core.pipeline import watch
from saev_core.pipeline.file import Pipeline, ProbePlan, VisualsPlan, check_outputs
from saev_core.record import checkpoints, vit
from saev_core.store import ActivationStore
from saev_core.train import results, trainer
from saev_core.visuals import render


@dataclasses.dataclass(frozen=True)
class LayerSweep:
    """One layer's trained sweep, as the CLI and the Dagster asset report it."""

    results: list
    """results.MemberResult per member."""
    csv_path: str
    table: typing.Any
    """sweep.csv: one row per member (config, held-out metrics, checkpoint path)."""
    l0_vs_nmse_png: bytes
    problems: list[str]
    """What fails the sweep's health rule ([checks] max_frac_dead, NaN); empty when healthy."""


def train_layer(
    pipe: Pipeline, layer: int, store_path: str, show_progress: bool = True, on_log=None, on_note=None
) -> LayerSweep:
    """Train the pipeline's [sweep] on one layer of a store (one pass), then summarise it."""
    cfgs = pipe.sweep_for(layer, store_path)
    members = trainer.train_sweep(cfgs, show_progress=show_progress, on_log=on_log, on_note=on_note)
    csv_path = results.sweep_csv_path(cfgs[0].ckpt_path)
    table = pd.read_csv(csv_path)
    return LayerSweep(
        results=members,
        csv_path=csv_path,
        table=table,
        l0_vs_nmse_png=plots.l0_vs_nmse_png(table, f"layer {layer}"),
        problems=metrics.sweep_problems(table.to_dict("records"), pipe.checks.max_frac_dead)
        + _nmse_problems(pipe, table),
    )


def sweep_report(pipe: Pipeline, sweep_csvs: dict[int, str]) -> tuple[str, list]:
    """The report over the given layers' sweeps (layer -> sweep.csv), written beside the checkpoints; returns the
    report's path and the per-layer reports (``saev_core.analysis.report.LayerReport``)."""
    layers = []
    for layer, csv in sorted(sweep_csvs.items()):
        table = pd.read_csv(csv)
        row = table.iloc[0]
        store = ActivationStore.open(row["data.shard_root"])
        split = (layer, row["data.patches"], float(row["data.val_frac"]), int(row["seed"]))
        pca = report.pca_baseline(store, *split, pipe.report.pca_max_vectors) if pipe.report.pca else None
        held_out = controls.held_out(store, *split) if pipe.report.random_control else None
        splice = None
        if pipe.report.splice:
            ckpts = list(table["ckpt"])
            splice = dict(zip(ckpts, report.splice_results(ckpts, pipe.report.splice_max_images)))
        layers.append(report.layer_report(layer, csv, pipe.report.max_l0, pca, splice, held_out))
    return report.write_report(pipe.train.ckpt_path, layers), layers


def _nmse_problems(pipe: Pipeline, table) -> list[str]:
    """[checks] max_nmse: the sweep fails when even its best member reconstructs worse than the bound."""
    best = float(table["nmse"].min())
    if pipe.checks.max_nmse is None or best <= pipe.checks.max_nmse:
        return []
    return [f"best held-out NMSE {best:.4f} is above [checks] max_nmse {pipe.checks.max_nmse:g}"]


def choose_members(plan: VisualsPlan | ProbePlan, rows: list[dict], source: str) -> list[dict]:
    """The sweep rows (``sweep.csv``) that get visuals under the plan's rule."""
    if plan.members == "all":
        return rows
    best = metrics.best_member(rows, plan.max_l0)
    if best is None:
        raise UserError(
            f"No member of {source} has finite metrics and L0 <= {plan.max_l0}; raise [visuals] max_l0 "
            'or use members = "all".'
        )
    return [best]


@dataclasses.dataclass(frozen=True)
class MemberVisuals:
    member_id: str
    ckpt_path: str
    result: typing.Any
    """render.VisualsResult"""


def visuals_for_layer(pipe: Pipeline, layer: int, sweep_csv: str, show_progress: bool = True) -> list[MemberVisuals]:
    """Top-k visuals for the chosen members of one layer's sweep, one folder each; records which folders exist in
    <dump_to>/layer_<layer>/members.json (what the Dagster check reads)."""

    rows = pd.read_csv(sweep_csv).to_dict("records")
    done = []
    for row in choose_members(pipe.visuals, rows, sweep_csv):
        cfg = dataclasses.replace(
            pipe.visuals.visuals, ckpt=row["ckpt"], dump_to=pipe.visuals.folder(layer, row["member_id"])
        )
        done.append(MemberVisuals(row["member_id"], row["ckpt"], render.make_visuals(cfg, show_progress)))
    files.atomic_write_json(
        os.path.join(pipe.visuals.folder(layer), "members.json"), {"members": [m.member_id for m in done]}
    )
    return done


def dropped_visuals_folder(pipe: Pipeline) -> str:
    """Where the visuals of the watched folder's files go: <[visuals] dump_to>/dropped/<file name>/."""
    return os.path.join(pipe.visuals.visuals.dump_to, "dropped")


def dropped_sae_visuals(pipe: Pipeline, name: str, show_progress: bool = False):
    """Top-k visuals of one file of the watched folder ([watch] folder); returns render.VisualsResult."""
    if pipe.watch.folder is None:
        raise UserError(f"{pipe.path} has no [watch] folder; add one to render dropped SAE files.")
    cfg = watch.dropped_visuals_config(pipe.visuals.visuals, pipe.watch.folder, name, dropped_visuals_folder(pipe))
    return render.make_visuals(cfg, show_progress)


def layer_visuals_problems(pipe: Pipeline, layer: int) -> list[str]:
    """What is missing from a layer's visuals (one line per problem; empty when every selected latent of every
    member has its full set of images on disk)."""
    listed = files.read_json(os.path.join(pipe.visuals.folder(layer), "members.json"))
    if listed is None:
        return [f"no visuals for layer {layer} under {pipe.visuals.folder(layer)}"]
    return [
        f"{member}: {problem}"
        for member in listed["members"]
        for problem in render.missing_images(pipe.visuals.folder(layer, member))
    ]


def prepare_demo_checkpoint(pipe: Pipeline) -> None:
    """With [demo] random_vit, create the random-weight checkpoint the pipeline names when it is missing."""
    check_outputs(pipe)
    if not pipe.demo.random_vit:
        return
    ref = checkpoints.parse_ckpt(pipe.activations.vit_family, pipe.activations.vit_ckpt, must_exist=False)
    if ref.path is not None and not os.path.exists(ref.path):
        vit.save_random_weights(ref.family, ref.arch, ref.path, seed=pipe.activations.seed)


@dataclasses.dataclass(frozen=True)
class LayerProbes:
    """One layer's patch probes: each chosen member's result, or a note when the store has no patch labels."""

    members: list[tuple[str, typing.Any]]
    """(member_id, probe_run.ProbeResult) per chosen member."""
    note: str | None = None


def probes_for_layer(pipe: Pipeline, layer: int, sweep_csv: str, show_progress: bool = True) -> LayerProbes:
    """[probe]: patch probes of the chosen members of one layer's sweep, each into <member folder>/probes/; a note
    instead when the layer's store has no per-patch labels."""
    from saev_core.analysis import probe_run, probes

    if pipe.probe is None:
        raise UserError(f"{pipe.path} has no [probe] table; add one to fit patch probes.")
    rows = pd.read_csv(sweep_csv).to_dict("records")
    store = ActivationStore.open(rows[0]["data.shard_root"])
    if not store.patch_class_names:
        return LayerProbes(
            [], f"no patch probes: the store {store.path} has no per-patch labels; {probes.NO_LABELS_FIX}"
        )
    done = []
    for row in choose_members(pipe.probe, rows, sweep_csv):
        cfg = dataclasses.replace(
            pipe.probe.probe,
            ckpt=row["ckpt"],
            dump_to=pipe.probe.folder(row["ckpt"]),
            data=config.ProbeDataConfig(val_frac=float(row["data.val_frac"]), seed=int(row["seed"])),
        )
        done.append((row["member_id"], probe_run.run_probes(cfg, show_progress)))
    return LayerProbes(done)
