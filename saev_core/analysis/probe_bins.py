"""Patch probes' bins: each latent's value bin edges (quantiles of its nonzero calibration values, finer in the top
tail, plus a bin of its own for exactly 0), one sortable int64 key per (latent, value), and the accumulator that
counts per (latent, bin, class) what the pass sees (``BinnedData``). Memory: latents x bins x classes, never
patches. The overview: ``saev_core.analysis.probes``; docs/probes.md."""

import dataclasses
import math

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saev_core.errors import UserError

N_BINS = 64
"""Value bins per latent (memory 24 bytes x latents x bins x classes)."""


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


class BinAccumulator:
    """One encoder's running binned counts and value sums (train), counts (held out) and held-out extremes."""

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
