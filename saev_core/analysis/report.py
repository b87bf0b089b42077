"""The sweep report: per layer a verdict in plain words, then every member in one table beside its controls, the
chosen member, and an L0-vs-NMSE plot with the PCA curve. ``sweep_report`` (Dagster) and ``python -m saev_core
pipeline`` write it as ``<train.ckpt_path>/report.md`` with one PNG per layer beside it; every path in it is
relative to that folder."""

import dataclasses
import math
import os

import pandas as pd

from saev_core import config
from saev_core.analysis import columns, controls, plots
from saev_core.files import atomic_write_bytes, is_url, read_json
from saev_core.nn import metrics

SHORT_RUN_STEPS = 1_000
"""Fewer training steps than this and the verdict calls the run short: its numbers are provisional."""
MAX_FRAC_DENSE = 0.1
"""More latents than this firing on over ``metrics.DENSE_FREQ`` of held-out vectors and the verdict says so."""


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What the verdict needs to know about how a layer's sweep was made, beyond sweep.csv."""

    n_train_vectors: int
    """Vectors in the training split (one epoch)."""
    random_vit: bool = False
    """The ViT has random weights (the demo): its activations need not have sparse structure."""
    max_frac_dead: float = 0.5
    """[checks] max_frac_dead: the bound the dead fraction is held to."""
    min_gain_vs_random: float = config.MIN_GAIN_VS_RANDOM
    """[checks] min_gain_vs_random: how much less error than the random-decoder control counts as structure."""


@dataclasses.dataclass(frozen=True)
class LayerReport:
    layer: int
    table: pd.DataFrame
    """sweep.csv with the controls (``controls.GAINS``) and, when asked for, the splice-in columns."""
    chosen: dict | None
    pca: controls.PCABaseline | None
    png: bytes
    verdict: list[str]
    """The layer's verdict, one sentence per line (markdown)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Controls left out and why."""


def layer_report(
    layer: int,
    sweep: controls.SweepControls,
    max_l0: float | None,
    facts: RunFacts,
    splice: dict | None = None,
    seeds: dict | None = None,
) -> LayerReport:
    """One layer's report from its sweep table with controls; ``splice`` maps ``ckpt`` to a ``splice.SpliceResult``
    and ``seeds`` is the chosen member's seed-consistency result (``seeds.SeedConsistency`` as a dict)."""
    table = with_probe_columns(sweep.table.copy())
    chosen = metrics.best_member(table.to_dict("records"), max_l0)
    if splice is not None:
        for column, field in SPLICE_COLUMNS.items():
            table[column] = [getattr(splice[c], field) if c in splice else math.nan for c in table["ckpt"]]
    png = plots.l0_vs_nmse_png(
        table,
        f"layer {layer}",
        pca=plots.pca_curve(sweep.pca.nmse, table["l0"].max()) if sweep.pca else None,
        chosen=chosen["member_id"] if chosen else None,
    )
    lines = verdict(table, chosen, max_l0, facts, seeds)
    return LayerReport(layer, table, chosen, sweep.pca, png, lines, list(sweep.notes))


PROBE_COLUMNS = ["map", "coverage", "pca_map", "random_map", "kmeans_map"]
"""From a member's probes/probe.json (``analysis.probe_run``): its patch probes' mAP and Coverage@tau, and each
control's mAP."""


def probe_json_path(ckpt: str) -> str:
    """Where the probe stage ([probe], ``pipeline.stages.probes_for_layer``) writes a member's probe.json."""
    return os.path.join(os.path.dirname(ckpt), "probes", "probe.json")


def with_probe_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The table with ``PROBE_COLUMNS`` when any member has a probe.json (NaN for the others)."""
    docs = [read_json(probe_json_path(c)) if isinstance(c, str) else None for c in table["ckpt"]]
    if not any(docs):
        return table
    table["map"] = [_num(d, "map") for d in docs]
    table["coverage"] = [_num(d, "coverage") for d in docs]
    for name in ("pca", "random", "kmeans"):
        table[f"{name}_map"] = [_num((d or {}).get("controls", {}).get(name), "map") for d in docs]
    return table


def _num(doc: dict | None, key: str) -> float:
    value = None if doc is None else doc.get(key)
    return math.nan if value is None else float(value)


SPLICE_COLUMNS = {"splice_cos": "cos_sae", "splice_cos_zero": "cos_zero", "splice_gap_recovered": "gap_recovered"}
"""Report column -> ``splice.SpliceResult`` field."""


def splice_results(ckpts: list[str], max_images: int, device: str = "auto") -> list:
    """Splice-in fidelity of each member (``[report] splice = true``)."""
    from saev_core.analysis import splice

    return splice.evaluate_checkpoints(ckpts, device=device, max_images=max_images)


# ----------------------------------------------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------------------------------------------

CONTROL_NAMES = {
    "pca_nmse_at_l0": "PCA at matched L0",
    "random_nmse_at_l0": "the random-decoder control at matched L0",
    "kmeans_nmse": "k-means (L0 = 1)",
}


def verdict(
    table: pd.DataFrame, chosen: dict | None, max_l0: float | None, facts: RunFacts, seeds: dict | None = None
) -> list[str]:
    """A layer's verdict in plain words: which member is chosen and why, whether it beats each control, its dead and
    dense fractions against their bounds, whether the run was long enough, and what a loss most likely means."""
    rule = f"with L0 <= {max_l0:g}" if max_l0 is not None else "of the sweep"
    if chosen is None:
        return [f"**No member qualifies**: none has finite metrics and L0 {rule.removeprefix('with ')}."]
    n_rule = sum(1 for r in table.to_dict("records") if max_l0 is None or r["l0"] <= max_l0)
    lines = [
        f"**Chosen: {chosen['member_id']}** ({_describe(chosen)}): the lowest held-out NMSE, {chosen['nmse']:.4f} at "
        f"L0 {chosen['l0']:.1f}, among the {n_rule} members {rule}."
    ]
    compared = []
    for column, name in CONTROL_NAMES.items():
        other = chosen.get(column, math.nan)
        change = controls.gain(chosen["nmse"], other)
        if change != change:
            continue
        if change >= 0:
            compared.append(f"beats {name} by {change:.0%} (NMSE {other:.4f})")
        else:
            compared.append(f"**loses to {name} by {-change:.0%}** (NMSE {other:.4f})")
    if compared:
        lines.append("It " + "; ".join(compared) + ".")
    steps = _steps(chosen)
    epochs = steps * int(chosen.get("sae_batch_size", 0)) / facts.n_train_vectors if facts.n_train_vectors else 0
    short = steps < SHORT_RUN_STEPS
    causes = [f"under-trained ({steps:,} steps)"] if short else []
    if facts.random_vit:
        causes.append("no sparse structure to find (the ViT has random weights)")
    else:
        causes.append("no sparse structure in these activations at this L0")
    if not short:
        causes.append(f"a learning rate that does not fit (lr {chosen['lr']:g})")
    versus_random = controls.gain(chosen["nmse"], chosen.get("random_nmse_at_l0", math.nan))
    versus_pca = controls.gain(chosen["nmse"], chosen.get("pca_nmse_at_l0", math.nan))
    shortfalls = []
    if versus_random == versus_random and versus_random < facts.min_gain_vs_random:
        shortfalls.append(
            f"{_signed(versus_random)} error than random atoms chosen the same way, under the "
            f"{facts.min_gain_vs_random:.0%} margin asked for"
        )
    if versus_pca == versus_pca and versus_pca < 0:
        shortfalls.append(f"{-versus_pca:.0%} more error than PCA at the same L0")
    d_vit = chosen.get("sae.d_vit", math.nan)
    if chosen["l0"] >= d_vit:
        shortfalls.append(
            f"L0 {chosen['l0']:.1f} is at least d_vit ({int(d_vit)}): PCA and random atoms reconstruct exactly there, "
            "so there is nothing to beat"
        )
    if shortfalls:
        lines.append(
            f"**No structure found**: {'; '.join(shortfalls)}. Most likely: {' or '.join(causes)}. (Beating PCA alone "
            "proves nothing: a sparse code picks its atoms per vector and beats PCA even on Gaussian noise.)"
        )
    elif versus_random == versus_random:
        lines.append(
            f"**Structure found**: {versus_random:.0%} less error than random atoms chosen the same way (margin "
            f"{facts.min_gain_vs_random:.0%})"
            + (f" and {versus_pca:.0%} less than PCA at the same L0." if versus_pca == versus_pca else ".")
        )
    dead = chosen.get("frac_dead_train", chosen.get("frac_dead", math.nan))
    window = chosen.get("sae.dead_after_n_patches")
    where = f"the last {int(window):,} training vectors" if window == window and window is not None else "training"
    over = " — **over the bound**" if dead > facts.max_frac_dead else ""
    dense = chosen.get("frac_dense", math.nan)
    width = chosen.get("sae.d_vit", math.nan) * chosen.get("sae.exp_factor", math.nan)
    if chosen["l0"] / width > metrics.DENSE_FREQ / 2:  # the average latent fires that often: "dense" says little
        dense_over = " — expected at this L0 and width, where the average latent fires that often"
    else:
        dense_over = " — **many**: dense latents are rarely interpretable" if dense > MAX_FRAC_DENSE else ""
    lines.append(
        f"Dead latents (did not fire in {where}): {dead:.1%} (bound {facts.max_frac_dead:.0%}){over}. Dense "
        f"latents (fire on over {metrics.DENSE_FREQ:.0%} of held-out vectors): {dense:.1%}"
        f" (warned above {MAX_FRAC_DENSE:.0%}){dense_over}."
    )
    warmup = chosen.get("n_lr_warmup")
    warm = f", {int(warmup):,} warm-up steps" if warmup == warmup and warmup is not None else ""
    length = (
        f"Trained {steps:,} steps of {int(chosen.get('sae_batch_size', 0)):,} vectors ({epochs:.1f} epochs of "
        f"{facts.n_train_vectors:,} training vectors{warm})"
    )
    lines.append(
        length + (f": **short** (under {SHORT_RUN_STEPS:,} steps), so these numbers are provisional." if short else ".")
    )
    if chosen.get("map", math.nan) == chosen.get("map", math.nan) and "map" in chosen:
        others = [
            f"{name} {chosen[f'{key}_map']:.3f}"
            for key, name in (("pca", "PCA"), ("random", "random atoms"), ("kmeans", "k-means"))
            if chosen.get(f"{key}_map", math.nan) == chosen.get(f"{key}_map", math.nan)
        ]
        lines.append(
            f"Patch probes: mAP {chosen['map']:.3f}"
            + (f" (controls: {', '.join(others)})" if others else "")
            + f"; coverage {chosen['coverage']:.0%} (classes whose best latent reaches AP >= [probe] tau; "
            "docs/probes.md)."
        )
    if seeds:
        lines.append(
            f"Seed consistency: retrained with seed {seeds['other_seed']}, its decoder atoms match this run's with "
            f"mean cosine {seeds['mean_cos']:.3f} (Hungarian matching; {seeds['frac_above_0_9']:.0%} of atoms above "
            "0.9)."
        )
    return lines


def _signed(change: float) -> str:
    return f"{change:.0%} less" if change >= 0 else f"{-change:.0%} more"


def _describe(row: dict) -> str:
    parts = [str(row.get("sae.arch", ""))]
    k = row.get("sae.k")
    if k == k and k is not None and row.get("sae.arch") in ("topk", "batchtopk"):
        parts.append(f"k = {int(k)}")
    if row.get("sae.d_vit") == row.get("sae.d_vit") and row.get("sae.exp_factor") is not None:
        parts.append(f"{int(row['sae.d_vit'] * row['sae.exp_factor']):,} latents")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.3g}")
    return ", ".join(parts)


def _steps(row: dict) -> int:
    batch = row.get("sae_batch_size", 0)
    return int(row.get("n_patches", 0) // batch) if batch else 0


# ----------------------------------------------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------------------------------------------


def member_rows(layers: list[LayerReport]) -> list[dict]:
    """Every member of every layer as one row: its sweep.csv columns plus ``layer`` and ``chosen``."""
    rows = []
    for rep in layers:
        chosen = rep.chosen["member_id"] if rep.chosen else None
        rows += [
            {**row, "layer": rep.layer, "chosen": row["member_id"] == chosen} for row in rep.table.to_dict("records")
        ]
    return rows


def write_report(
    folder: str, layers: list[LayerReport], provenance: list[str] | None = None, title: str = "SAE sweep report"
) -> str:
    """report.md and report_layer_<L>.png in ``folder``; returns the report's path. ``provenance``: the lines of the
    header (``provenance_lines``)."""
    lines = [f"# {title}", ""]
    if provenance:
        lines += [f"- {line}" for line in provenance] + [""]
    for rep in layers:
        png_name = f"report_layer_{rep.layer}.png"
        atomic_write_bytes(os.path.join(folder, png_name), rep.png)
        lines += [f"## Layer {rep.layer}", ""]
        lines += [f"{line}" for line in rep.verdict] + [""]
        lines += [f"_{note}_" for note in rep.notes] + ([""] if rep.notes else [])
        lines += [f"![L0 vs NMSE, layer {rep.layer}]({png_name})", "", markdown_table(rep.table, folder), ""]
    lines += ["## Columns", ""] + [f"- `{name}`: {meaning}" for name, meaning in GLOSSARY.items()] + [""]
    path = os.path.join(folder, "report.md")
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def provenance_lines(
    folder: str,
    *,
    vit: str,
    random_vit: bool,
    images: str,
    n_imgs: int,
    store_key: str,
    store_path: str,
    training: list[str],
    pipeline_file: str,
    code_version: str,
) -> list[str]:
    """The report's header: where every number below comes from."""
    return [
        f"ViT: {vit}" + (" — **random weights** (the demo: no download)" if random_vit else ""),
        f"Images: {images} ({n_imgs:,} images)",
        f"Activation store: `{relative(store_path, folder)}` (key `{store_key}`)",
        *[f"Training: {line}" for line in training],
        f"Pipeline file: `{relative(pipeline_file, folder)}`",
        f"Code: {code_version}",
    ]


def relative(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` (the report's), so the report can move with its files; URLs unchanged."""
    if not isinstance(path, str) or is_url(path) or not os.path.isabs(path):
        return path
    return os.path.relpath(path, folder)


REPORT_COLUMNS = [
    "member_id",
    "sae.arch",
    "sae.exp_factor",
    "sae.k",
    "lr",
    "nmse",
    *columns.CONTROL_COLUMNS,
    "l0",
    "l0_train",
    "frac_dead_train",
    "frac_dead_heldout",
    "frac_dense",
    *PROBE_COLUMNS,
    *SPLICE_COLUMNS,
    "ckpt",
]

GLOSSARY = {
    "member_id": "12 hex digits naming the member's settings; its checkpoint is `<layer folder>/<member_id>/sae.pt`",
    "sae.arch": "the SAE recipe (relu, relu-decnorm, topk, batchtopk, jumprelu)",
    "sae.exp_factor": "latents per ViT dimension (d_sae = exp_factor x d_vit)",
    "sae.k": "latents kept per vector (topk) or per vector on average over a batch (batchtopk) in training",
    "lr": "the learning rate",
    "nmse": "held-out reconstruction error over the held-out variance: 0 is perfect, 1 is no better than the mean",
    "pca_nmse_at_l0": "NMSE of PCA with round(L0) components, fitted on the training split",
    "random_nmse_at_l0": "NMSE of d_sae random unit atoms, round(L0) per vector chosen as TopK does, least-squares "
    "coefficients",
    "kmeans_nmse": "NMSE of k-means with d_sae centroids (L0 = 1)",
    "gain_vs_pca / gain_vs_random / gain_vs_kmeans": "the fraction by which the SAE's NMSE is below that control's "
    "(positive: the SAE is better)",
    "l0": "latents firing per held-out vector, on average (at inference; batchtopk uses its calibrated threshold)",
    "l0_train": "latents firing per training vector, on average, at the end of training",
    "frac_dead_train": "**dead**: latents that did not fire in the last `sae.dead_after_n_patches` training vectors "
    "(the one definition of dead: docs/training.md)",
    "frac_dead_heldout": "latents that fired on no held-out vector (a rare latent can be silent there and alive)",
    "frac_dense": f"latents firing on over {metrics.DENSE_FREQ:.0%} of held-out vectors",
    "map / coverage": "patch probes ([probe], docs/probes.md): mean over classes of the held-out AP of each class's "
    "best 1-D latent probe; the share of classes whose best latent reaches AP >= tau",
    "pca_map / random_map / kmeans_map": "the same mAP with the controls' directions as latents",
    "splice_*": "splice-in fidelity: cosine of the ViT's final embedding with the layer replaced by the "
    "reconstruction (splice_cos) or by zeros (splice_cos_zero), and the gap recovered",
    "ckpt": "the member's checkpoint, relative to this report",
}


def markdown_table(table: pd.DataFrame, folder: str | None = None) -> str:
    shown = table[columns.present(table, REPORT_COLUMNS)].copy()
    if folder is not None and "ckpt" in shown:
        shown["ckpt"] = [relative(p, folder) for p in shown["ckpt"]]
    return shown.to_markdown(index=False, floatfmt=".4g")
