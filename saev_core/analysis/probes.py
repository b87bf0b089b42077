"""Patch probes: does one latent pick out the patches of a class? (Stevens et al., arXiv 2511.17735; docs/probes.md)

For every (latent, class) a 1-D logistic probe ``p = sigmoid(w * f_latent(patch) + b)`` is fitted on the training
split's labelled patches (label == class vs any other class); each class's **best latent** is the one of lowest
training loss. On the held-out split: **AP** of the best latent's probe scores, **mAP** over classes,
**Purity@k** (the share of its top-k held-out patches that belong to the class) and **Coverage@tau** (the share of
classes whose best latent reaches AP >= tau). A 1-D probe ranks like ``sign(w) * f``, so AP and Purity@k use the
latent's own values in the direction of ``w``. Unlabelled patches (label 0) are left out of training and evaluation
(ADE20K's convention: 0 is "not annotated", ignored by its benchmark).

**One pass, memory independent of the number of patches.** Each latent's values are cut into ``n_bins`` bins
(quantiles of its nonzero values on a calibration sample of training patches, finer in the top tail, plus a bin of
its own for exactly 0). The pass counts per (latent, bin, class) the training patches and sums their values, and
counts the held-out patches; it keeps each latent's exact top-k and bottom-k held-out patches (value and class) for
Purity@k. Probes are then fitted to the binned training data (each bin's positives at their mean value, its
negatives at theirs) by vectorised Newton steps; AP is computed from the held-out bins, so it is the exact AP of the
bin-quantised scores (ties within a bin count as ties). Memory: O(latents x bins x classes + latents x k), never
O(patches); the patch-label array of the store is read whole (one small int per patch).

The pass only touches nonzero latent values (the zero bin's counts are the class totals minus the rest), so a
sparse SAE costs little beyond its own forward. Controls (PCA directions, the random-decoder control, k-means) go
through the same pass as further "encoders" (``probe_run``).
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Float, Int, Integer
from torch import Tensor
from tqdm.auto import tqdm

from saev_core.errors import UserError
from saev_core.store import ActivationStore
from saev_core.store.shards import ChunkReader, stream_chunks
from saev_core.store.tokens import first_patch

N_BINS = 64
"""Value bins per latent (memory 24 bytes x latents x bins x classes)."""
TOP_K = 100
"""Purity@k's k."""
TAU = 0.3
"""Coverage@tau's AP threshold (the paper's)."""
RIDGE = 1e-4
"""L2 penalty on the standardised probe weight: keeps w finite when a latent separates a class perfectly."""
NEWTON_STEPS = 40
NO_LABELS_FIX = (
    "record the images with per-patch labels: `activations ... data:seg-folder-dataset --data.root DIR` (ADE20K "
    "layout), or the embedded segmentation set"
)

Encode = Callable[[Float[Tensor, "n d_vit"]], Float[Tensor, "n width"]]
"""Raw activations in, one value per "latent" out (an SAE's encode, or a control's)."""


# ----------------------------------------------------------------------------------------------------------------
# Exact metrics on arrays (the reference for the binned ones)
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Bins: per-latent edges, and one sortable int64 key per (latent, value)
# ----------------------------------------------------------------------------------------------------------------


def sortable_keys(latents: Int[Tensor, " n"], values: Float[Tensor, " n"]) -> Int[Tensor, " n"]:
    """Keys that order by latent, then by value (float32 bits made monotone): one searchsorted bins every entry."""
    bits = values.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    monotone = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF) + 2**31  # in [0, 2**32)
    return latents.to(torch.int64) * 2**32 + monotone


def quantile_levels(n_bins: int) -> Float[np.ndarray, " q"]:
    """The quantile levels of a latent's nonzero values that cut its bins: two thirds uniform, one third in the top
    tail (1 - 10^-1.5 .. 1 - 10^-4), where Purity and AP of a selective latent are decided."""
    n_q = n_bins - 3  # the other two edges cut out the bin of exact zeros
    n_tail = n_q // 3
    uniform = np.linspace(0, 1, n_q - n_tail + 2)[1:-1]
    return np.sort(np.r_[uniform, 1 - np.logspace(-1.5, -4, n_tail)])


def bin_edges(
    latents: Int[Tensor, " n"], values: Float[Tensor, " n"], width: int, n_bins: int
) -> Float[Tensor, "width edges"]:
    """Each latent's ``n_bins - 1`` sorted edges from its nonzero calibration values (entries (latent, value));
    a latent that never fired there gets the quantiles pooled over all latents."""
    if n_bins < 8:
        raise UserError(f"--n-bins {n_bins} is too few; pass at least 8 (64 is the default).")
    levels = torch.as_tensor(quantile_levels(n_bins), dtype=torch.float64, device=values.device)
    values = values.to(torch.float32)
    order = torch.argsort(sortable_keys(latents, values))
    v = values[order]
    count = torch.bincount(latents, minlength=width)
    start = torch.cumsum(count, 0) - count
    pos = start[:, None] + (levels[None, :] * (count[:, None] - 1).clamp(min=0)).floor().long()
    edges = v[pos.clamp(max=max(len(v) - 1, 0))] if len(v) else torch.zeros(width, len(levels), device=v.device)
    pooled = (
        torch.quantile(
            v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:100_000].to(v.device)].double(),
            levels,
        ).float()
        if len(v)
        else torch.linspace(-1, 1, len(levels), device=v.device)
    )
    edges = torch.where((count > 0)[:, None], edges, pooled[None, :])
    zero = torch.tensor([-torch.finfo(torch.float32).tiny, 0.0], device=v.device).expand(width, 2)
    return torch.sort(torch.cat([edges, zero], dim=1), dim=1).values


# ----------------------------------------------------------------------------------------------------------------
# The accumulated data of one encoder
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BinnedData:
    """What the pass keeps of one encoder: binned train and held-out counts and each latent's extreme held-out
    patches. Classes are 0..C-1 here (the store's labels minus one)."""

    edges: Float[Tensor, "width edges"]
    train_count: Float[Tensor, "width bins classes"]
    train_sum: Float[Tensor, "width bins classes"]
    val_count: Float[Tensor, "width bins classes"]
    top_values: Float[Tensor, "k2 width"]
    """The k largest held-out values of each latent, then the k smallest (negated), in no order."""
    top_classes: Int[Tensor, "k2 width"]
    """Their classes (-1: an empty slot)."""

    @property
    def width(self) -> int:
        return self.edges.shape[0]


class _Accumulator:
    def __init__(self, edges: Float[Tensor, "width edges"], n_classes: int, k: int):
        self.edges, self.n_classes, self.k = edges, n_classes, k
        width, device = edges.shape[0], edges.device
        self.n_bins = edges.shape[1] + 1
        ids = torch.arange(width, device=device).repeat_interleave(edges.shape[1])
        self.edge_keys = sortable_keys(ids, edges.reshape(-1))
        shape = width * self.n_bins * n_classes
        self.train_count = torch.zeros(shape, dtype=torch.float64, device=device)
        self.train_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.val_count = torch.zeros(shape, dtype=torch.float64, device=device)
        self.class_total = {s: torch.zeros(n_classes, dtype=torch.float64, device=device) for s in ("train", "val")}
        self.top = torch.full((2 * k, width), -math.inf, device=device)
        self.top_classes = torch.full((2 * k, width), -1, dtype=torch.int64, device=device)

    def add(self, f: Float[Tensor, "n width"], classes: Int[Tensor, " n"], split: str) -> None:
        rows, lat = f.nonzero(as_tuple=True)
        values = f[rows, lat]
        keys = sortable_keys(lat, values)
        bins = torch.searchsorted(self.edge_keys, keys) - lat * (self.n_bins - 1)
        index = (lat * self.n_bins + bins) * self.n_classes + classes[rows]
        ones = torch.ones_like(index, dtype=torch.float64)
        self.class_total[split] += torch.bincount(classes, minlength=self.n_classes).double()
        if split == "train":
            self.train_count.index_add_(0, index, ones)
            self.train_sum.index_add_(0, index, values.double())
            return
        self.val_count.index_add_(0, index, ones)
        for half, signed in ((slice(0, self.k), f), (slice(self.k, 2 * self.k), -f)):
            merged = torch.cat([self.top[half], signed.float()])
            kept = merged.topk(min(self.k, len(merged)), dim=0)
            old = self.top_classes[half]
            from_old = kept.indices < self.k
            new_cls = classes[(kept.indices - self.k).clamp(min=0)]
            cls = torch.where(from_old, old.gather(0, kept.indices.clamp(max=self.k - 1)), new_cls)
            n = kept.values.shape[0]
            self.top[half][:n], self.top_classes[half][:n] = kept.values, cls

    def result(self) -> BinnedData:
        width, b, c = self.edges.shape[0], self.n_bins, self.n_classes
        zero_bin = torch.searchsorted(self.edges, torch.zeros(width, 1, device=self.edges.device)).squeeze(1)
        counts = {}
        for split, flat in (("train", self.train_count), ("val", self.val_count)):
            count = flat.view(width, b, c)
            missing = self.class_total[split][None, :] - count.sum(dim=1)  # the zeros, never scattered
            count[torch.arange(width, device=count.device), zero_bin] += missing
            counts[split] = count
        return BinnedData(
            self.edges, counts["train"], self.train_sum.view(width, b, c), counts["val"], self.top, self.top_classes
        )


# ----------------------------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------------------------


def labelled_patches(
    store: ActivationStore, layer: int, labels: Integer[np.ndarray, "n_imgs n_patches"], images: np.ndarray
):
    """Yield (image ids, vectors [n, d_vit] float32, classes [n] in 0..C-1) of the labelled patches of ``images``,
    a chunk at a time in store order."""
    first, ipc = first_patch(store), store.layout.imgs_per_chunk
    images = np.sort(np.asarray(images, dtype=np.int64))
    chunks, starts = np.unique(images // ipc, return_index=True)
    reader = ChunkReader(store.array(layer))
    for c, imgs, x in stream_chunks(reader, chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
        lab = labels[imgs]
        keep = lab > 0
        yield imgs, x[imgs - c * ipc, first:][keep].astype(np.float32, copy=False), lab[keep].astype(np.int64) - 1


def check_labels(store: ActivationStore, labels: np.ndarray | None, class_names: list[str]) -> None:
    """One line for a store without usable patch labels."""
    if labels is None:
        raise UserError(f"The store {store.path} has no per-patch labels, which patch probes need; {NO_LABELS_FIX}.")
    n_patches = store.n_tokens - first_patch(store)
    if labels.shape != (store.n_imgs, n_patches):
        raise UserError(
            f"The store {store.path}'s patch labels have shape {labels.shape}, not (n_imgs, n_patches) = "
            f"{(store.n_imgs, n_patches)}; record the store again."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(
            f"The store {store.path}'s patch labels run {labels.min()}..{labels.max()} but it names "
            f"{len(class_names)} classes (0 = unlabelled); record the store again."
        )


@torch.inference_mode()
def probe_pass(
    store: ActivationStore,
    layer: int,
    labels: Integer[np.ndarray, "n_imgs n_patches"],
    n_classes: int,
    train: np.ndarray,
    val: np.ndarray,
    encoders: dict[str, tuple[Encode, Float[Tensor, "width edges"]]],
    k: int = TOP_K,
    device: str = "cpu",
    batch_vectors: int = 4096,
    show_progress: bool = False,
) -> dict[str, BinnedData]:
    """One pass over the labelled patches of ``train`` and ``val`` images; each encoder (name -> (encode, its bin
    edges)) sees every batch. Returns each encoder's binned data."""
    acc = {name: _Accumulator(edges.to(device), n_classes, k) for name, (_, edges) in encoders.items()}
    is_val = np.zeros(store.n_imgs, dtype=bool)
    is_val[val] = True
    n_total = int((labels[np.r_[train, val]] > 0).sum())
    pending: dict[str, list] = {"train": [], "val": []}

    def flush(split: str) -> None:
        if not pending[split]:
            return
        x = torch.from_numpy(np.concatenate([p[0] for p in pending[split]])).to(device)
        classes = torch.from_numpy(np.concatenate([p[1] for p in pending[split]])).to(device)
        pending[split].clear()
        for start in range(0, len(x), batch_vectors):
            xb, cb = x[start : start + batch_vectors], classes[start : start + batch_vectors]
            for name, (encode, _) in encoders.items():
                acc[name].add(encode(xb), cb, split)
            bar.update(len(xb))

    with tqdm(total=n_total, unit="patch", unit_scale=True, desc="probes", disable=not show_progress) as bar:
        for imgs, x, classes in labelled_patches(store, layer, labels, np.r_[train, val]):
            per_img = (labels[imgs] > 0).sum(axis=1)
            owner = np.repeat(is_val[imgs], per_img)
            for split, mask in (("train", ~owner), ("val", owner)):
                if mask.any():
                    pending[split].append((x[mask], classes[mask]))
                    if sum(len(p[0]) for p in pending[split]) >= batch_vectors:
                        flush(split)
        flush("train")
        flush("val")
    return {name: a.result() for name, a in acc.items()}


# ----------------------------------------------------------------------------------------------------------------
# Fitting the probes
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeFit:
    """Every (latent, class) probe, in raw latent units: p = sigmoid(weight * f + bias)."""

    weight: Float[np.ndarray, "width classes"]
    bias: Float[np.ndarray, "width classes"]
    loss: Float[np.ndarray, "width classes"]
    """Mean training logistic loss (without the ridge term); NaN for a class without training positives."""


def _mean_loss(x: Tensor, n: Tensor, y: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Mean logistic loss of probes (w, b) [P] over their weighted points x, n, y [P, M]."""
    z = w[:, None] * x + b[:, None]
    return (n * (torch.nn.functional.softplus(z) - y * z)).sum(-1) / n.sum(-1)


def _gradient_hessian(x: Tensor, n: Tensor, y: Tensor, w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The mean loss's gradient [P, 2] (d/dw, d/db) and Hessian [P, 3] (ww, wb, bb)."""
    p = torch.sigmoid(w[:, None] * x + b[:, None])
    total = n.sum(-1, keepdim=True)
    r, h = n * (p - y), n * p * (1 - p)
    grad = torch.stack([(r * x).sum(-1), r.sum(-1)], -1) / total
    hess = torch.stack([(h * x * x).sum(-1), (h * x).sum(-1), h.sum(-1)], -1) / total
    return grad, hess


def _binned_points(pos: Tensor, pos_sum: Tensor):
    """The weighted points of every probe of a few latents: (x [l, C, 2 bins] standardised mean values, n counts,
    y targets), each latent's (mean, sd) and each class's training prevalence."""
    tot, tot_sum = pos.sum(-1, keepdim=True), pos_sum.sum(-1, keepdim=True)  # [l, bins, 1]
    neg, neg_sum = tot - pos, tot_sum - pos_sum
    n_all = tot.sum(1)  # [l, 1]
    mean = tot_sum.sum(1) / n_all.clamp(min=1)
    bin_mean = torch.where(tot > 0, tot_sum / tot.clamp(min=1), 0.0)
    sd = ((tot * (bin_mean - mean[:, None]) ** 2).sum(1) / n_all.clamp(min=1)).sqrt()
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # [l, 1]
    mean_of = [torch.where(c > 0, s / c.clamp(min=1e-300), 0.0) for s, c in ((pos_sum, pos), (neg_sum, neg))]
    x = ((torch.cat(mean_of, 1) - mean[:, None]) / sd[:, None]).transpose(1, 2)
    n = torch.cat([pos, neg], 1).transpose(1, 2)
    y = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)], 1).transpose(1, 2)
    prior = (pos.sum(1) / n_all.clamp(min=1)).clamp(1e-6, 1 - 1e-6)  # [l, C]
    return x, n, y, mean, sd, prior


def _newton(x: Tensor, n: Tensor, y: Tensor, prior: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(w, b, mean loss) of every probe: Newton steps on the ridge-penalised loss from w = 0, b = logit(prevalence),
    halving a probe's step while it does not lower that probe's objective; a probe stops once its Newton decrement
    (what a full step would still gain, x2) is below 1e-10, and later steps work on the others only."""
    shape = prior.shape
    x, n, y = (t.reshape(-1, t.shape[-1]) for t in (x, n, y))
    w, b = torch.zeros(prior.numel(), dtype=x.dtype, device=x.device), torch.log(prior / (1 - prior)).reshape(-1)
    loss = _mean_loss(x, n, y, w, b)
    active = torch.arange(len(w), device=x.device)
    for _ in range(NEWTON_STEPS):
        xa, na, ya, wa, ba = x[active], n[active], y[active], w[active], b[active]
        grad, hess = _gradient_hessian(xa, na, ya, wa, ba)
        g_w, g_b = grad[:, 0] + RIDGE * wa, grad[:, 1]
        h_ww, h_wb, h_bb = hess[:, 0] + RIDGE, hess[:, 1], hess[:, 2] + 1e-12
        det = h_ww * h_bb - h_wb**2
        d_w, d_b = (h_bb * g_w - h_wb * g_b) / det, (h_ww * g_b - h_wb * g_w) / det
        moving = g_w * d_w + g_b * d_b > 1e-10
        if not moving.any():
            break
        active, xa, na, ya, wa, ba, d_w, d_b = (t[moving] for t in (active, xa, na, ya, wa, ba, d_w, d_b))
        objective = loss[active] + RIDGE / 2 * wa**2
        step = torch.ones_like(wa)
        for _ in range(20):
            nw, nb = wa - step * d_w, ba - step * d_b
            new_loss = _mean_loss(xa, na, ya, nw, nb)
            worse = new_loss + RIDGE / 2 * nw**2 > objective + 1e-15 * objective.abs()
            if not worse.any():
                break
            step = torch.where(worse, step / 2, step)
        better = ~worse  # a probe no halving improves has converged as far as float64 tells
        active = active[better]
        w[active], b[active], loss[active] = nw[better], nb[better], new_loss[better]
    return w.reshape(shape), b.reshape(shape), loss.reshape(shape)


def fit_probes(data: BinnedData, chunk: int = 256) -> ProbeFit:
    """Every probe, ``chunk`` latents at a time, on the binned training data: a bin's positives sit at their mean
    value, its negatives at theirs (exact when a bin holds one value)."""
    width, _, n_classes = data.train_count.shape
    out = {name: np.empty((width, n_classes)) for name in ("weight", "bias", "loss")}
    for lo in range(0, width, chunk):
        pos = data.train_count[lo : lo + chunk]
        x, n, y, mean, sd, prior = _binned_points(pos, data.train_sum[lo : lo + chunk])
        w, b, loss = _newton(x, n, y, prior)
        out["weight"][lo : lo + chunk] = (w / sd).cpu().numpy()
        out["bias"][lo : lo + chunk] = (b - w * mean / sd).cpu().numpy()
        out["loss"][lo : lo + chunk] = torch.where(pos.sum(1) > 0, loss, torch.nan).cpu().numpy()
    return ProbeFit(**out)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


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
