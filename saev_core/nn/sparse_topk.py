"""Sparse training of topk and batchtopk SAEs: the same loss and gradients as their dense forward, less work.

With k of d_sae latents active per vector only the encoder's forward matmul needs every latent. Everything after
the top-k selection touches only the selected (vector, latent) entries:

- the selection runs without autograd on the dense pre-activations (the dense pass's own numbers, so both paths
  choose the same latents);
- ``SelectedPreActs`` hands the selected pre-activations to autograd; its backward builds the encoder's gradient
  from the selected columns only (``W_enc.grad[:, l] = sum of g * (x_n - b_dec)`` over the entries of latent l,
  ``b_enc.grad[l]`` = sum of g: one ``embedding_bag`` over the entries grouped by latent) and ``b_dec.grad`` from
  them (no gradient is needed for the input);
- the reconstruction is a weighted sum of the selected decoder rows (``embedding_bag`` with per-sample weights),
  whose autograd gives the decoder rows' and the activations' gradients without a dense matmul. Matryoshka
  prefixes come from one call: entries sorted by (vector, latent) fall into contiguous segments per prefix band,
  and a cumulative sum over the bands gives every prefix's reconstruction;
- AuxK does the same with the top-k_aux dead latents.

Gradients stay dense tensors (zero outside the selected rows and columns), so Adam, the decoder-norm hooks and the
clipping see exactly what the dense path gives them. Only the float summation order differs (tests compare the
weights after many steps). ``use_sparse`` picks this path when it is faster (docs/benchmarks.md).
"""

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from saev_core import config
from saev_core.nn.sae import mean_squared_error

SparseSetting = Literal["auto", "on", "off"]

MAX_AUTO_K_FRACTION = 1 / 12
"""``sparse_topk`` auto trains sparsely when k / d_sae is at most this: measured on 2 CPU cores at d_vit 768,
d_sae 6144, the sparse step is ~4x faster at k = 32 and still faster at k = 128, and the gain shrinks as k grows
(the per-entry work grows with k, the dense work does not; docs/benchmarks.md)."""

SPARSE_ARCHS = ("topk", "batchtopk")


def use_sparse(setting: SparseSetting, sae: config.SparseAutoencoderConfig) -> bool:
    """Whether an SAE trains through this module: only topk and batchtopk can; ``on`` and ``off`` force it,
    ``auto`` takes it when k / d_sae <= ``MAX_AUTO_K_FRACTION``."""
    if sae.arch not in SPARSE_ARCHS or setting == "off":
        return False
    return setting == "on" or sae.k <= MAX_AUTO_K_FRACTION * sae.d_sae


class Selection(NamedTuple):
    """Selected (vector, latent) entries (sorted by vector then latent, except AuxK's)."""

    row: Int[Tensor, " n_sel"]
    """The vector (batch row) of each entry."""
    lat: Int[Tensor, " n_sel"]
    """The latent of each entry."""
    pre: Float[Tensor, " n_sel"]
    """Its pre-activation, as the dense pass computed it (no autograd)."""


def select_topk(pre: Float[Tensor, "batch d_sae"], k: int) -> Selection:
    """The k largest pre-activations of every row (TopK's training and inference selection)."""
    vals, idx = pre.topk(k, dim=-1)
    lat, order = idx.sort(dim=-1)
    row = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return Selection(row, lat.flatten(), vals.gather(-1, order).flatten())


def select_batch_topk(pre: Float[Tensor, "batch d_sae"], k: int) -> Selection:
    """The batch * k largest pre-activations of the whole batch (BatchTopK's training selection)."""
    flat = pre.flatten()
    idx = largest_flat(pre, k * pre.shape[0]).sort().values
    d_sae = pre.shape[1]
    return Selection(idx // d_sae, idx % d_sae, flat[idx])


SAMPLE_ROWS = 256
"""``largest_flat``: rows (at least) in the sample that estimates the threshold."""
SAMPLE_MARGIN = 1.25
"""``largest_flat``: the sample's threshold keeps this many times its share of the n, so that enough pass."""


def largest_flat(pre: Float[Tensor, "batch d_sae"], n: int) -> Int[Tensor, " n"]:
    """Flat indices of the n largest entries, as ``pre.flatten().topk(n)`` finds them (set equal up to ties), in a
    fraction of its time: on a CPU a top-k of batch * k of batch * d_sae entries costs about a dense matmul.

    A sample of rows gives a threshold low enough that about ``SAMPLE_MARGIN * n`` entries pass it. When at least n
    pass, every one of the n largest is among them (each is >= the n-th largest >= the threshold), so a top-n of the
    candidates is exact; otherwise (an unlucky sample) the full top-k runs."""
    batch = pre.shape[0]
    flat = pre.flatten()
    sample = pre[:: max(1, batch // SAMPLE_ROWS)]
    n_sample = math.ceil(n * sample.shape[0] / batch * SAMPLE_MARGIN)
    if n_sample < sample.numel():
        threshold = sample.flatten().topk(n_sample, sorted=False).values.min()
        candidates = (flat >= threshold).nonzero().squeeze(1)
        if candidates.numel() >= n:
            return candidates[flat[candidates].topk(n, sorted=False).indices]
    return flat.topk(n, sorted=False).indices


class SelectedPreActs(torch.autograd.Function):
    """``(x_n[row] - b_dec) @ W_enc[:, lat] + b_enc[lat]`` for the selected entries, with gradients to W_enc, b_enc
    and b_dec (not to x_n). The forward returns the dense pass's values (already computed); the backward costs
    O(entries * d_vit), not a dense matmul."""

    @staticmethod
    def forward(ctx, pre, row, lat, centered_and_one, W_enc, b_enc, b_dec):
        ctx.save_for_backward(row, lat, centered_and_one, W_enc)
        return pre.clone()

    @staticmethod
    def backward(ctx, grad):
        row, lat, centered_and_one, W_enc = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        # Column l of W_enc's gradient is the sum of g * (x_n - b_dec) over latent l's entries, and b_enc[l]'s the sum
        # of g: group the entries by latent and let one embedding_bag sum each group over the inputs with a column of
        # ones appended (an empty group gives zeros). Unlike index_add_ on a GPU, it sums in a fixed order.
        order = torch.argsort(lat, stable=True)
        counts = torch.zeros(d_sae, dtype=torch.long, device=lat.device).index_add_(0, lat, torch.ones_like(lat))
        starts = torch.cumsum(counts, 0) - counts
        sums = F.embedding_bag(row[order], centered_and_one, starts, mode="sum", per_sample_weights=grad[order])
        grad_w_enc, grad_b_enc = sums[:, :-1].T, sums[:, -1].contiguous()
        # d pre / d b_dec = -W_enc[:, lat]; summed over the entries that is -W_enc @ grad_b_enc.
        grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, None, None, grad_w_enc, grad_b_enc, grad_b_dec


def selected_pre_acts(
    sel: Selection, x_n: Float[Tensor, "batch d_vit"], sae: torch.nn.Module
) -> Float[Tensor, " n_sel"]:
    """The selected pre-activations of ``sae.pre_acts`` (``(x_n - b_dec) @ W_enc + b_enc``), differentiable."""
    centered = (x_n - sae.b_dec).detach()
    centered_and_one = torch.cat([centered, centered.new_ones(centered.shape[0], 1)], dim=1)
    return SelectedPreActs.apply(sel.pre, sel.row, sel.lat, centered_and_one, sae.W_enc, sae.b_enc, sae.b_dec)


def decode_bands(
    sel: Selection,
    f: Float[Tensor, " n_sel"],
    W_dec: Float[Tensor, "d_sae d_vit"],
    bounds: tuple[int, ...],
    batch: int,
) -> Float[Tensor, "batch n_bands d_vit"]:
    """Per vector and per latent band ``[bounds[i-1], bounds[i])`` (the first from 0), the sum of ``f * W_dec[lat]``
    over its entries (zero for a band without entries): one ``embedding_bag`` over the sorted entries."""
    d_sae = W_dec.shape[0]
    key = sel.row * d_sae + sel.lat
    band_starts = torch.tensor((0, *bounds[:-1]), device=key.device)
    first_keys = (torch.arange(batch, device=key.device)[:, None] * d_sae + band_starts).flatten()
    offsets = torch.searchsorted(key, first_keys)
    bands = F.embedding_bag(sel.lat, W_dec, offsets, mode="sum", per_sample_weights=f)
    return bands.view(batch, len(bounds), -1)


def train_forward(
    sae: torch.nn.Module, x: Float[Tensor, "batch d_vit"]
) -> tuple[Float[Tensor, "batch d_vit"], Float[Tensor, "batch d_sae"], Tensor, Tensor]:
    """A topk or batchtopk SAE's training forward, sparse: ``(x_hat_n, f_x, mse, aux)`` as its dense forward
    computes them (``x_hat_n`` in normalised space; ``f_x`` dense and detached: it is for statistics)."""
    x_n = sae.normalize(x)
    with torch.no_grad():
        pre = sae.pre_acts(x_n)
    batch = x.shape[0]
    select = select_batch_topk if sae.cfg.arch == "batchtopk" else select_topk
    sel = select(pre, sae.cfg.k)
    f = selected_pre_acts(sel, x_n, sae).relu()
    bands = decode_bands(sel, f, sae.W_dec, sae.prefix_sizes, batch)
    if len(sae.prefix_sizes) == 1:
        x_hat_n = bands[:, 0] + sae.b_dec
        mse = mean_squared_error(x_n, x_hat_n)
    else:  # Matryoshka: prefix i reconstructs from bands 0..i alone, as the dense path's cumulative sums do
        prefixes = bands.cumsum(dim=1) + sae.b_dec
        x_hat_n = prefixes[:, -1]
        mse = torch.stack([mean_squared_error(x_n, prefixes[:, i]) for i in range(len(sae.prefix_sizes))]).mean()
    aux = _aux_loss(sae, x_n, pre, x_hat_n)
    with torch.no_grad():  # the dense activations, written over the pre-activations no longer needed
        f_x = pre.zero_().view(-1).index_put_((sel.row * pre.shape[1] + sel.lat,), f.detach()).view_as(pre)
    return x_hat_n, f_x, mse, aux


def _aux_loss(
    sae: torch.nn.Module,
    x_n: Float[Tensor, "batch d_vit"],
    pre: Float[Tensor, "batch d_sae"],
    x_hat_n: Float[Tensor, "batch d_vit"],
) -> Tensor:
    """``TopKSAE.aux_loss`` on the selected dead latents only (overwrites ``pre``'s live latents with -inf)."""
    dead = sae.dead_latents()
    n_dead = int(dead.sum())
    if n_dead == 0 or sae.cfg.auxk_alpha == 0:
        return x_n.new_zeros(())
    k_aux = min(sae.cfg.k_aux, n_dead)
    batch = x_n.shape[0]
    with torch.no_grad():
        vals, idx = pre.masked_fill_(~dead, -torch.inf).topk(k_aux, dim=-1)
    # One bag per row: no band offsets, so the entries need no sorting.
    row = torch.arange(batch, device=idx.device).repeat_interleave(k_aux)
    f_aux = selected_pre_acts(Selection(row, idx.flatten(), vals.flatten()), x_n, sae).relu()
    e_hat = F.embedding_bag(idx, sae.W_dec, mode="sum", per_sample_weights=f_aux.view(batch, k_aux))
    residual = (x_n - x_hat_n).detach()
    variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    return sae.cfg.auxk_alpha * (e_hat - residual).pow(2).sum() / variance
