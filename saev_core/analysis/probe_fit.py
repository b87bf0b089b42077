"""Patch probes' fit: every (latent, class) 1-D logistic probe at once, by vectorised Newton steps on the binned
training data (a bin's positives at their mean value, its negatives at theirs). The overview:
``saev_core.analysis.probes``; docs/probes.md."""

import dataclasses

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev_core.analysis.probe_bins import BinnedData

RIDGE = 1e-4
"""L2 penalty on the standardised probe weight: keeps w finite when a latent separates a class perfectly."""
NEWTON_STEPS = 40


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
