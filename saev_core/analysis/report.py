"""The sweep report: every member of every layer in one table, the chosen member per layer, and an L0-vs-NMSE plot
per layer with a PCA baseline at matched L0. ``sweep_report`` (Dagster) and ``python -m saev_core pipeline`` write
it as ``<train.ckpt_path>/report.md`` with one PNG per layer beside it."""

import dataclasses
import math
import os

import numpy as np
import pandas as pd
from jaxtyping import Float

from saev_core.analysis import controls, plots
from saev_core.files import atomic_write_bytes
from saev_core.nn import metrics
from saev_core.store import ActivationStore, loader
from saev_core.store.shards import ChunkReader, stream_chunks
from saev_core.store.tokens import check_token_mode, first_patch, vectors, vectors_per_image


@dataclasses.dataclass(frozen=True)
class PCABaseline:
    """Held-out NMSE of PCA with k components, fitted on the training split (k = 1..d_vit)."""

    nmse: Float[np.ndarray, " d_vit"]
    """nmse[k - 1]: the baseline at k components."""

    def at(self, l0: float | int) -> float:
        """The baseline at matched L0 (k = round(L0), at least 1)."""
        k = min(max(1, round(l0)), len(self.nmse))
        return float(self.nmse[k - 1])


def _scatter_matrix(store: ActivationStore, layer: int, patches: str, images: np.ndarray, center: np.ndarray | None):
    """(sum of vectors, count, sum of (x - c)(x - c)^T) over the token mode's vectors of ``images``, float64;
    c = ``center`` or 0."""
    ipc, first = store.layout.imgs_per_chunk, first_patch(store)
    chunks, starts = np.unique(images // ipc, return_index=True)
    d = store.d_vit
    total, n, scatter = np.zeros(d), 0, np.zeros((d, d))
    c = np.zeros(d) if center is None else center
    reader = ChunkReader(store.array(layer))
    for chunk, imgs, x in stream_chunks(reader, chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
        v = vectors(x[imgs - chunk * ipc], patches, first).astype(np.float64) - c
        total += v.sum(0) + len(v) * c
        n += len(v)
        scatter += v.T @ v
    return total, n, scatter


def pca_baseline(
    store: ActivationStore, layer: int, patches: str, val_frac: float, seed: int, max_vectors: int = 200_000
) -> PCABaseline:
    """PCA fitted on the training split of the SAEs' own train/val split (``loader.split_images``), evaluated on the
    held-out split with the same NMSE definition as the SAEs' (``metrics``): sum ||x - x_hat||^2 over
    sum ||x - mean_val||^2. Each split reads at most about ``max_vectors`` vectors (a uniform, seeded sample of its
    images)."""
    check_token_mode(store, patches)
    train, val = loader.split_images(store, val_frac, seed)
    per_img = vectors_per_image(store, patches)
    rng = np.random.default_rng(seed)

    def sample(images: np.ndarray) -> np.ndarray:
        cap = max(1, max_vectors // per_img)
        return np.sort(rng.choice(images, cap, replace=False)) if len(images) > cap else images

    train, val = sample(train), sample(val)
    total, n, _ = _scatter_matrix(store, layer, patches, train, None)
    mean = total / n
    _, _, cov = _scatter_matrix(store, layer, patches, train, mean)
    eigvals, eigvecs = np.linalg.eigh(cov)
    components = eigvecs[:, np.argsort(eigvals)[::-1]]  # [d, d], columns by decreasing variance
    val_total, n_val, val_scatter = _scatter_matrix(store, layer, patches, val, mean)  # around the train mean
    val_mean = val_total / n_val
    # sum ||x - mean_val||^2 = sum ||x - mean||^2 - n ||mean_val - mean||^2
    denom = float(np.trace(val_scatter)) - n_val * float((val_mean - mean) @ (val_mean - mean))
    # residual of the k-component reconstruction: trace(S) - sum_{i<k} p_i^T S p_i, S the scatter around the mean
    explained = np.cumsum(np.einsum("di,de,ei->i", components, val_scatter, components))
    return PCABaseline((float(np.trace(val_scatter)) - explained) / denom)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    layer: int
    table: pd.DataFrame
    chosen: dict | None
    pca: PCABaseline | None
    png: bytes


def layer_report(
    layer: int,
    sweep_csv: str,
    max_l0: float | None,
    pca: PCABaseline | None,
    splice: dict | None = None,
    held_out: controls.HeldOut | None = None,
) -> LayerReport:
    """One layer's table (sweep.csv plus the PCA baseline, the random-decoder control on ``held_out`` and, when
    given, the splice-in columns keyed by ``ckpt``), its chosen member and its plot."""
    table = pd.read_csv(sweep_csv)
    if pca is not None:
        table["pca_nmse_at_l0"] = [pca.at(l0) if l0 == l0 else math.nan for l0 in table["l0"]]
    if held_out is not None:
        table["random_nmse_at_l0"] = [
            controls.random_decoder_nmse(held_out, int(d_vit * exp), l0) if l0 == l0 else math.nan
            for d_vit, exp, l0 in zip(table["sae.d_vit"], table["sae.exp_factor"], table["l0"])
        ]
    chosen = metrics.best_member(table.to_dict("records"), max_l0)
    if splice is not None:
        for column, field in SPLICE_COLUMNS.items():
            table[column] = [getattr(splice[c], field) if c in splice else math.nan for c in table["ckpt"]]
    ks = []
    if pca is not None:  # the baseline over the members' L0 range and a little beyond
        top = int(min(max(float(table["l0"].max()), 1.0) * 1.5, len(pca.nmse)))
        ks = list(range(1, top + 1))
    png = plots.l0_vs_nmse_png(
        table,
        f"layer {layer}",
        pca=(ks, [pca.at(k) for k in ks]) if pca else None,
        chosen=chosen["member_id"] if chosen else None,
    )
    return LayerReport(layer, table, chosen, pca, png)


SPLICE_COLUMNS = {"splice_cos": "cos_sae", "splice_cos_zero": "cos_zero", "splice_gap_recovered": "gap_recovered"}
"""Report column -> ``splice.SpliceResult`` field."""


def splice_results(ckpts: list[str], max_images: int, device: str = "auto") -> list:
    """Splice-in fidelity of each member (``[report] splice = true``)."""
    from saev_core.analysis import splice

    return splice.evaluate_checkpoints(ckpts, device=device, max_images=max_images)


def member_rows(layers: list[LayerReport]) -> list[dict]:
    """Every member of every layer as one row: its sweep.csv columns plus ``layer`` and ``chosen``."""
    rows = []
    for rep in layers:
        chosen = rep.chosen["member_id"] if rep.chosen else None
        rows += [
            {**row, "layer": rep.layer, "chosen": row["member_id"] == chosen} for row in rep.table.to_dict("records")
        ]
    return rows


def write_report(folder: str, layers: list[LayerReport], title: str = "SAE sweep report") -> str:
    """report.md and report_layer_<L>.png in ``folder``; returns the report's path."""
    lines = [f"# {title}", ""]
    for rep in layers:
        png_name = f"report_layer_{rep.layer}.png"
        atomic_write_bytes(os.path.join(folder, png_name), rep.png)
        lines += [
            f"## Layer {rep.layer}",
            "",
            markdown_summary(rep),
            "",
            f"![L0 vs NMSE, layer {rep.layer}]({png_name})",
            "",
            markdown_table(rep.table),
            "",
        ]
    path = os.path.join(folder, "report.md")
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


REPORT_COLUMNS = [
    "member_id",
    "sae.arch",
    "sae.exp_factor",
    "sae.k",
    "lr",
    "nmse",
    "pca_nmse_at_l0",
    "random_nmse_at_l0",
    "l0",
    "frac_dead_train",
    "frac_dead_heldout",
    *SPLICE_COLUMNS,
    "ckpt",
]


def markdown_summary(rep: LayerReport) -> str:
    if rep.chosen is None:
        return "No member qualifies under the [report] rule."
    nmse = rep.chosen["nmse"]
    versus = []
    if rep.pca is not None:
        versus.append(("PCA", rep.pca.at(rep.chosen["l0"])))
    if "random_nmse_at_l0" in rep.chosen:
        versus.append(("the random-decoder control", rep.chosen["random_nmse_at_l0"]))
    compared = "".join(f"; {name} at matched L0: {other:.4f} ({_beats(nmse, other)})" for name, other in versus)
    return (
        f"Chosen: **{rep.chosen['member_id']}** ({rep.chosen.get('sae.arch', '')}), NMSE "
        f"{nmse:.4f} at L0 {rep.chosen['l0']:.1f}{compared}."
    )


def _beats(nmse: float, other: float) -> str:
    """How the SAE's NMSE compares with a baseline's, in the words the report uses."""
    if not (nmse == nmse and other == other and other > 0):
        return "not comparable"
    change = (other - nmse) / other
    return f"the SAE is {change:.0%} better" if change >= 0 else f"the SAE is {-change:.0%} worse"


def markdown_table(table: pd.DataFrame) -> str:
    return table[[c for c in REPORT_COLUMNS if c in table]].to_markdown(index=False, floatfmt=".4g")
