"""Patch probes' metrics: AP and Purity@k, exactly on arrays (the reference) and from the bins and kept extremes
(``evaluate``: each class's best latent by training loss, its held-out AP and Purity@k; mAP, Coverage@tau). The
overview: ``saev_core.analysis.probes``; docs/probes.md."""

import dataclasses
import math

import numpy as np
from jaxtyping import Float

from saev_core.analysis.probe_bins import BinnedData
from saev_core.analysis.probe_fit import ProbeFit
from saev_core.errors import UserError

TOP_K = 100
"""Purity@k's k."""
TAU = 0.3
"""Coverage@tau's AP threshold (the paper's)."""


def _ap_from_groups(pos: Float[np.ndarray, "... g"], total: Float[np.ndarray, "... g"]) -> Float[np.ndarray, "..."]:
    """AP from groups of tied scores listed best first: sum over groups of (recall gained) x (precision after the
    group). NaN where there is no positive."""
    tp, n = np.cumsum(pos, axis=-1), np.cumsum(total, axis=-1)
    n_pos = tp[..., -1] if tp.shape[-1] else np.zeros(tp.shape[:-1])
    precision = np.divide(tp, n, out=np.zeros_like(tp, dtype=np.float64), where=n > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_pos > 0, (pos * precision).sum(axis=-1) / n_pos, np.nan)


def average_precision(scores: Float[np.ndarray, " n"], positive: np.ndarray) -> float:
    """Average precision of ``scores`` for the boolean ``positive`` (tied scores form one step, as in scikit-learn's
    ``average_precision_score``); NaN without positives."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if len(scores) == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last index of each group of tied scores
    tp = np.cumsum(p)[ends]
    size = np.diff(np.r_[0, ends + 1])
    return float(_ap_from_groups(np.diff(np.r_[0, tp]).astype(np.float64), size.astype(np.float64)))


def purity_at_k(scores: Float[np.ndarray, " n"], positive: np.ndarray, k: int) -> float:
    """Share of positives among the k highest scores (k capped at n); scores tied with the k-th count pro rata."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    k = min(k, len(scores))
    if k == 0:
        return math.nan
    kth = np.sort(scores)[len(scores) - k]
    above, tied = scores > kth, scores == kth
    return float((positive[above].sum() + (k - above.sum()) * positive[tied].mean()) / k)


@dataclasses.dataclass(frozen=True)
class ClassProbe:
    """One class's best latent and its held-out metrics (``ap``/``purity_at_k`` None when it has no held-out or no
    training patch)."""

    class_name: str
    best_latent: int | None
    ap: float | None
    purity_at_k: float | None
    weight: float | None
    train_loss: float | None
    n_train: int
    n_val: int

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"class": d.pop("class_name"), **d}


@dataclasses.dataclass(frozen=True)
class ProbeMetrics:
    """The metrics of one encoder (the SAE or a control)."""

    name: str
    width: int
    classes: list[ClassProbe]
    map: float
    coverage: float
    purity_at_k: float
    k: int
    tau: float

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "width": self.width,
            "map": self.map,
            "coverage": self.coverage,
            "purity_at_k": self.purity_at_k,
            "k": self.k,
            "tau": self.tau,
            "n_classes_evaluated": sum(c.ap is not None for c in self.classes),
            "classes": [c.as_dict() for c in self.classes],
        }


def _none_if_nan(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def evaluate(
    name: str, data: BinnedData, fit: ProbeFit, class_names: list[str], k: int = TOP_K, tau: float = TAU
) -> ProbeMetrics:
    """Each class's best latent by training loss, its held-out AP (from the bins, in the direction of its weight)
    and Purity@k (from the kept extremes; zeros among them count pro rata from the zero bin)."""
    if k < 1:
        raise UserError(f"--k {k} must be at least 1 (Purity@k's k).")
    val = data.val_count.cpu().numpy()  # [width, bins, C]
    train_pos = data.train_count.sum(1).cpu().numpy()[0] if data.width else np.zeros(len(class_names))
    val_pos = val.sum(1)[0] if data.width else np.zeros(len(class_names))
    top_v, top_c = data.top_values.cpu().numpy(), data.top_classes.cpu().numpy()
    k_kept = top_v.shape[0] // 2
    zero_bins = (data.edges.cpu().numpy() < 0).sum(1)  # each latent's bin of exact zeros
    rows = []
    for c, cname in enumerate(class_names):
        n_train, n_val = int(train_pos[c]), int(val_pos[c])
        losses = fit.loss[:, c]
        if n_train == 0 or not np.isfinite(losses).any():
            rows.append(ClassProbe(cname, None, None, None, None, None, n_train, n_val))
            continue
        j = int(np.nanargmin(losses))
        w = float(fit.weight[j, c])
        ap = purity = math.nan
        if n_val > 0:
            pos, total = val[j, :, c], val[j].sum(1)
            if w > 0:
                pos, total = pos[::-1], total[::-1]
            elif w == 0:
                pos, total = pos.sum(keepdims=True), total.sum(keepdims=True)
            ap = float(_ap_from_groups(pos.astype(np.float64), total.astype(np.float64)))
            purity = _purity(top_v, top_c, val[j], int(zero_bins[j]), j, c, k, w, k_kept)
        rows.append(ClassProbe(cname, j, _none_if_nan(ap), _none_if_nan(purity), w, float(losses[j]), n_train, n_val))
    done = [r for r in rows if r.ap is not None]
    return ProbeMetrics(
        name=name,
        width=data.width,
        classes=rows,
        map=float(np.mean([r.ap for r in done])) if done else math.nan,
        coverage=float(np.mean([r.ap >= tau for r in done])) if done else math.nan,
        purity_at_k=float(np.mean([r.purity_at_k for r in done])) if done else math.nan,
        k=k,
        tau=tau,
    )


def _purity(top_v, top_c, val_j, zero_bin: int, j: int, c: int, k: int, w: float, k_kept: int) -> float:
    """Purity@k of latent j for class c in the direction of w, from its kept top (w > 0) or bottom (w < 0) held-out
    values; slots holding exactly 0 are filled with the zero bin's class mix (zeros are one big tie)."""
    n_val = val_j.sum()
    k = int(min(k, n_val, k_kept))
    if k == 0:
        return math.nan
    if w == 0:
        return float(val_j[:, c].sum() / n_val)
    half = slice(0, k_kept) if w > 0 else slice(k_kept, 2 * k_kept)
    v, cls = top_v[half, j], top_c[half, j]
    order = np.argsort(-v, kind="stable")[:k]
    v, cls = v[order], cls[order]
    nonzero = (v != 0) & (cls >= 0)
    n_fill = k - nonzero.sum()
    zero_share = val_j[zero_bin, c] / max(val_j[zero_bin].sum(), 1)
    return float(((cls[nonzero] == c).sum() + n_fill * zero_share) / k)
