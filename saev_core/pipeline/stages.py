"""The pipeline's stages: train a layer's sweep, render the chosen members' visuals, write the report, render a
dropped SAE file, make the demo's random weights, fit the chosen members' patch probes. The CLI's ``pipeline``
command and the Dagster assets both call these, so a stage is written once."""

import dataclasses
import os
import typing

import numpy as np

from saev_core import config, files
from saev_core.analysis import controls, plots, report
from saev_core.errors import UserError
from saev_core.nn import metrics
from saev_core.pipeline import watch
from saev_core.pipeline.file import Pipeline, ProbePlan, VisualsPlan, check_outputs
from saev_core.record import checkpoints, vit
from saev_core.store import ActivationStore, loader
from saev_core.store.tokens import vectors_per_image
from saev_core.train import fitting, results, sweep, trainer
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
    health: typing.Any = None
    """metrics.SweepHealth: the check's numbers and severity."""


def train_layer(
    pipe: Pipeline, layer: int, store_path: str, show_progress: bool = True, on_log=None, on_note=None
) -> LayerSweep:
    """Train the pipeline's [sweep] on one layer of a store (one pass), add its controls to sweep.csv, then
    summarise it."""
    cfgs = pipe.sweep_for(layer, store_path)
    members = trainer.train_sweep(cfgs, show_progress=show_progress, on_log=on_log, on_note=on_note)
    csv_path = results.sweep_csv_path(cfgs[0].ckpt_path)
    with_controls = layer_controls(pipe, csv_path, fresh=True)
    table = with_controls.table
    health = metrics.sweep_health(
        table.to_dict("records"),
        pipe.checks.max_frac_dead,
        pipe.checks.max_nmse,
        pipe.report.max_l0,
        pipe.checks.min_gain_vs_random,
    )
    return LayerSweep(
        results=members,
        csv_path=csv_path,
        table=table,
        l0_vs_nmse_png=plots.l0_vs_nmse_png(table, f"layer {layer}", pca=_pca_curve(with_controls.pca, table)),
        problems=health.problems,
        health=health,
    )


def _pca_curve(pca, table) -> tuple[list[int], list[float]] | None:
    return None if pca is None else plots.pca_curve(pca.nmse, float(table["l0"].max()))


def controls_json_path(sweep_csv: str) -> str:
    """Beside sweep.csv: the PCA curve and the notes of the controls (their per-member columns are in sweep.csv)."""
    return os.path.join(os.path.dirname(sweep_csv), "controls.json")


def layer_controls(pipe: Pipeline, sweep_csv: str, fresh: bool = False) -> controls.SweepControls:
    """A sweep's table with the controls [report] asks for. They are computed once after training (``fresh``: the
    trainer has just rewritten sweep.csv) and kept in sweep.csv and controls.json; the report computes only those
    still missing (a sweep from ``python -m saev_core train``, or [report] changed since)."""
    table = results.read_sweep_csv(sweep_csv)
    kept = {} if fresh else (files.read_json(controls_json_path(sweep_csv)) or {})
    plan = pipe.report
    need_pca = plan.pca and ("pca_nmse_at_l0" not in table or "pca_nmse" not in kept)
    need_random = plan.random_control and "random_nmse_at_l0" not in table
    need_kmeans = plan.kmeans is not False and "kmeans_nmse" not in table and (plan.kmeans or "kmeans" not in kept)
    notes = list(kept.get("notes", []))
    pca = controls.PCABaseline(np.asarray(kept["pca_nmse"])) if plan.pca and not need_pca else None
    if need_pca or need_random or need_kmeans:
        row = table.iloc[0]
        store = ActivationStore.open(row["data.shard_root"])
        got = controls.sweep_controls(
            table,
            store,
            int(row["data.layer"]),
            row["data.patches"],
            float(row["data.val_frac"]),
            int(row["seed"]),
            pca=need_pca,
            random=need_random,
            kmeans=plan.kmeans if need_kmeans else False,
            pca_max_vectors=plan.pca_max_vectors,
        )
        table, pca, notes = got.table, got.pca or pca, notes + got.notes
        files.atomic_write(sweep_csv, lambda f: f.write(table.to_csv(index=False).encode()))
        kept = {"pca_nmse": None if pca is None else [float(v) for v in pca.nmse], "notes": notes}
        if need_kmeans:
            kept["kmeans"] = "kmeans_nmse" in table
        files.atomic_write_json(controls_json_path(sweep_csv), kept)
    return controls.SweepControls(table, pca, notes)


def sweep_report(pipe: Pipeline, sweep_csvs: dict[int, str]) -> tuple[str, list]:
    """The report over the given layers' sweeps (layer -> sweep.csv), written beside the checkpoints; returns the
    report's path and the per-layer reports (``saev_core.analysis.report.LayerReport``)."""
    layers = []
    folder = pipe.train.ckpt_path
    stores = {}
    for layer, csv in sorted(sweep_csvs.items()):
        sweep = layer_controls(pipe, csv)
        table = sweep.table
        row = table.iloc[0]
        store = stores.setdefault(row["data.shard_root"], ActivationStore.open(row["data.shard_root"]))
        train, _ = loader.split_images(store, float(row["data.val_frac"]), int(row["seed"]))
        facts = report.RunFacts(
            n_train_vectors=len(train) * vectors_per_image(store, row["data.patches"]),
            random_vit=pipe.demo.random_vit,
            max_frac_dead=pipe.checks.max_frac_dead,
            min_gain_vs_random=pipe.checks.min_gain_vs_random,
        )
        splice = None
        if pipe.report.splice:
            ckpts = list(table["ckpt"])
            splice = dict(zip(ckpts, report.splice_results(ckpts, pipe.report.splice_max_images)))
        chosen = metrics.best_member(table.to_dict("records"), pipe.report.max_l0)
        seeds = seed_consistency(pipe, layer, chosen) if pipe.report.seeds > 1 and chosen else None
        layers.append(report.layer_report(layer, sweep, pipe.report.max_l0, facts, splice, seeds))
    header = _provenance(pipe, folder, stores, sweep_csvs)
    return report.write_report(folder, layers, header), layers


def seed_consistency(pipe: Pipeline, layer: int, chosen: dict) -> dict:
    """[report] seeds = 2: the chosen member retrained from another initialisation (``sae.seed`` + 1000; the same
    data, split and order) into <layer folder>/seeds/, and its decoder matched to the chosen one's."""
    import torch

    from saev_core import nn
    from saev_core.analysis import seeds

    fitted = [fitting.fit_to_run(c)[0] for c in pipe.sweep_for(layer, chosen["data.shard_root"])]
    cfg = next(c for c in fitted if sweep.member_id(c) == chosen["member_id"])
    other_seed = cfg.sae.seed + 1000
    other = dataclasses.replace(
        cfg, sae=dataclasses.replace(cfg.sae, seed=other_seed), ckpt_path=os.path.join(cfg.ckpt_path, "seeds")
    )
    [result] = trainer.train_sweep([other], show_progress=False)
    with torch.no_grad():
        w_a = nn.load(chosen["ckpt"]).W_dec.detach().cpu().numpy()
        w_b = nn.load(result.ckpt_path).W_dec.detach().cpu().numpy()
    return dataclasses.asdict(seeds.consistency(w_a, w_b, other_seed, result.ckpt_path))


def _provenance(pipe: Pipeline, folder: str, stores: dict, sweep_csvs: dict[int, str]) -> list[str]:
    """The report header's facts: ViT, images, store, run length per member, pipeline file, code version."""
    store = next(iter(stores.values()))
    meta = store.metadata
    data = meta.get("data") or {}
    root = data.get("root")
    images = f"{data.get('kind', 'images')}" + (f" `{report.relative(root, folder)}`" if root else "")
    ref = checkpoints.parse_ckpt(meta.get("vit_family"), meta.get("vit_ckpt"), must_exist=False)
    vit = f"{meta.get('vit_family')} {ref.arch}" + (
        f" from `{report.relative(ref.path, folder)}`" if ref.path else f"/{meta.get('vit_ckpt').split('/', 1)[-1]}"
    )
    training = []
    for layer, csv in sorted(sweep_csvs.items()):
        table = results.read_sweep_csv(csv)
        runs = sorted({(int(n // b), int(n)) for n, b in zip(table["n_patches"], table["sae_batch_size"])})
        training.append(
            f"layer {layer}: {len(table)} members, "
            + ", ".join(f"{steps:,} steps ({n:,} vectors)" for steps, n in runs)
            + " each"
        )
    return report.provenance_lines(
        folder,
        vit=vit,
        random_vit=pipe.demo.random_vit,
        images=images,
        n_imgs=store.n_imgs,
        store_key=str(meta.get("key")),
        store_path=store.path,
        training=training,
        pipeline_file=pipe.path,
        code_version=code_version(),
    )


def code_version() -> str:
    """The installed saev-dagster version, and the git commit when run from a checkout."""
    import importlib.metadata
    import subprocess

    try:
        version = importlib.metadata.version("saev-dagster")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"saev-dagster {version}" + (f" (git {commit})" if commit else "")


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

    rows = results.read_sweep_csv(sweep_csv).to_dict("records")
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
    rows = results.read_sweep_csv(sweep_csv).to_dict("records")
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
