"""Sparse autoencoders behind one protocol, ``x_hat, f_x, loss = sae(x)``, and their checkpoint file.

Every variant takes *raw* activations. ``forward`` normalises them with the ``mean`` and ``scale`` buffers
(``x_n = (x - mean) * scale``; saved in the checkpoint, identity by default), encodes, decodes and computes the loss
in normalised space, and returns ``x_hat`` in raw space. The trainer, per step:

    sae.sparsity_scale = warmup_fraction        # 0..1, multiplies sparsity_coeff
    x_hat, f_x, loss = sae(x); loss.total.backward()
    sae.before_optimizer_step()                 # e.g. remove decoder-gradient parallel to the rows
    optimizer.step()
    sae.after_optimizer_step()                  # e.g. renormalise decoder rows

The loss (``Loss``; every term in normalised space, every average over the batch):

- ``mse = mean over the batch and the d_vit dimensions of (x_n - x_hat_n)^2``: saev 0.1.0's definition, so that a
  sparsity coefficient weighs the same against it as in saev. With ``scale_norm`` (E||x_n||^2 = d_vit) it is about
  the NMSE. Matryoshka: the mean of this over the prefixes.
- ``sparsity = sparsity_coeff * sparsity_scale * penalty``, the penalty summed over latents and averaged over the
  batch: ``sum f`` (relu: L1, as saev), ``sum f_i * ||W_dec[i]||`` (relu-decnorm), ``sum H(pre_i - threshold_i)``
  (jumprelu: L0); 0 for topk and batchtopk. A recipe whose MSE sums over d_vit instead (Anthropic's, for example)
  uses ``d_vit`` times our coefficient for the same trade-off.
- ``aux = auxk_alpha * ||e_hat - e||^2 / ||e - mean(e)||^2`` over the batch (AuxK, topk and batchtopk): the dead
  latents' reconstruction of the detached residual ``e``, relative to the residual's variance (Gao et al. 2024).

Every variant counts, in training mode, the patches since each latent last fired (``n_patches_since_fired``): a
latent is dead once the count reaches ``dead_after_n_patches`` (topk and batchtopk feed the dead ones to AuxK; the
trainer reports the training-stream dead count).

Checkpoint (``sae.pt``): one line of JSON header, ``{"schema": 1, "arch", "cfg", "d_vit", "d_sae", "provenance"}``,
then ``torch.save(state_dict)`` in the same file. saev 0.1.0 files (header without "schema") load as ``relu``.
"""

import dataclasses
import json
import os
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config
from saev_core.nn import sparse_topk
from saev_core.errors import UserError
from saev_core.files import atomic_write

SCHEMA = 1
CKPT_NAME = "sae.pt"
THRESHOLD_EMA = 0.01
"""BatchTopK: weight of each step's minimum kept activation in the running threshold (Bussmann et al. 2024)."""
_MAX_HEADER_BYTES = 1 << 20
NOMINAL_DEAD_AFTER_N_PATCHES = 10_000_000
"""``dead_after_n_patches`` left unset (None): this, unless the trainer fits it to a shorter run."""


class Loss(NamedTuple):
    """The training loss and its parts; every field is a scalar tensor computed in normalised space."""

    mse: Tensor
    """Squared error averaged over the batch and the d_vit dimensions, as saev 0.1.0 (Matryoshka: also averaged over
    prefixes)."""
    sparsity: Tensor
    """Penalty summed over latents, averaged over the batch, multiplied by sparsity_coeff * sparsity_scale (0 for
    topk and batchtopk)."""
    aux: Tensor
    """AuxK: auxk_alpha * the dead latents' squared error on the residual / the residual's variance (0 for other
    variants or with no dead latents)."""
    total: Tensor
    """mse + sparsity + aux: what the optimiser minimises."""


class Output(NamedTuple):
    x_hat: Float[Tensor, "*batch d_vit"]
    """Reconstruction in raw (un-normalised) space."""
    f_x: Float[Tensor, "*batch d_sae"]
    """Latent activations."""
    loss: Loss
    """The loss and its parts."""


def _mse(x: Float[Tensor, "batch d_vit"], x_hat: Float[Tensor, "batch d_vit"]) -> Tensor:
    """saev 0.1.0's MSE: the mean over every element (batch and d_vit)."""
    return (x - x_hat).pow(2).mean()


class SparseAutoencoder(torch.nn.Module):
    """Base of every variant: weights, normalisation buffers and the forward pass.

    Weights: ``W_enc [d_vit, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_vit]``, ``b_dec [d_vit]``.
    Buffers: ``mean [d_vit]``, ``scale []``, ``n_patches_since_fired [d_sae]`` (int64: patches since each latent
    last fired, counted in training mode). Subclasses choose ``activate`` and ``sparsity_penalty``.
    """

    init_decoder_norm: float = 1.0

    def __init__(self, cfg: config.SparseAutoencoderConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.provenance: dict = {}
        self.sparsity_coeff = cfg.sparsity_coeff
        self.sparsity_scale = 1.0
        """Sparsity warm-up factor in [0, 1], set by the trainer each step."""
        d_vit, d_sae = cfg.d_vit, cfg.d_sae
        self.W_enc = torch.nn.Parameter(torch.empty(d_vit, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, d_vit))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_vit))
        self.register_buffer("mean", torch.zeros(d_vit))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("n_patches_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.dead_after_n_patches = (NOMINAL_DEAD_AFTER_N_PATCHES if cfg.dead_after_n_patches is None
                                     else cfg.dead_after_n_patches)
        """Patches without firing after which a latent counts as dead (None in the config: the nominal default)."""
        self.reset_parameters(torch.Generator().manual_seed(cfg.seed))

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        """Gao et al. 2024: decoder rows in random directions (norm ``init_decoder_norm``), encoder = decoder.T."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_vit, generator=gen)
        w *= self.init_decoder_norm / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)

    # -- normalisation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_normalization(self, mean: Float[Tensor, " d_vit"], scale: float | Tensor) -> None:
        """x_n = (x - mean) * scale; both are saved in the checkpoint."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))

    @property
    def saved_no_normalization(self) -> bool:
        """A saev 0.1.0 file: no provenance and the identity normalisation. saev trained on normalised activations
        but saved no statistics, so the store's must be set (``stats.set_store_normalization``)."""
        return not self.provenance and not self.mean.any() and float(self.scale) == 1.0

    @torch.no_grad()
    def init_b_dec(self, mean_of_normalized_data: Float[Tensor, " d_vit"]) -> None:
        """Start b_dec at the data mean (in normalised space), as Gao et al. do (saev 0.1.0 defines this step but never
        calls it: its b_dec starts at 0)."""
        self.b_dec.copy_(torch.as_tensor(mean_of_normalized_data, dtype=self.b_dec.dtype))

    def normalize(self, x: Float[Tensor, "batch d_vit"]) -> Float[Tensor, "batch d_vit"]:
        return (x - self.mean) * self.scale

    def denormalize(self, x_n: Float[Tensor, "batch d_vit"]) -> Float[Tensor, "batch d_vit"]:
        return x_n / self.scale + self.mean

    # -- the protocol -----------------------------------------------------------------------------------------

    def pre_acts(self, x_n: Float[Tensor, "batch d_vit"]) -> Float[Tensor, "batch d_sae"]:
        return (x_n - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_sae"]:
        return pre.relu()

    def encode(self, x: Float[Tensor, "batch d_vit"]) -> Float[Tensor, "batch d_sae"]:
        """Latents of raw activations (uses the module's mode: batchtopk thresholds in eval mode)."""
        return self.activate(self.pre_acts(self.normalize(x)))

    def decode_prefix(self, f_x: Float[Tensor, "batch d_sae"], m: int) -> Float[Tensor, "batch d_vit"]:
        """Raw-space reconstruction from the first ``m`` latents only (Matryoshka prefix)."""
        return self.denormalize(f_x[:, :m] @ self.W_dec[:m] + self.b_dec)

    def decode(self, f_x: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_vit"]:
        """Raw-space reconstruction from all latents."""
        return self.denormalize(f_x @ self.W_dec + self.b_dec)

    def forward(self, x: Float[Tensor, "*batch d_vit"]) -> Output:
        """Any leading shape (saev's snippet passes [images, patches, d_vit]); x_hat and f_x keep it."""
        lead = x.shape[:-1]
        x_n = self.normalize(x.reshape(-1, x.shape[-1]))
        pre = self.pre_acts(x_n)
        f_x = self.activate(pre)
        x_hat_n = f_x @ self.W_dec + self.b_dec
        mse = self.reconstruction_mse(x_n, f_x, x_hat_n)
        sparsity = self.sparsity_coeff * self.sparsity_scale * self.sparsity_penalty(pre, f_x)
        aux = self.aux_loss(x_n, pre, x_hat_n)
        if self.training:
            self.update_stats(f_x)
        x_hat = self.denormalize(x_hat_n).reshape(*lead, -1)
        return Output(x_hat, f_x.reshape(*lead, -1), Loss(mse, sparsity, aux, mse + sparsity + aux))

    def reconstruction_mse(
        self,
        x_n: Float[Tensor, "batch d_vit"],
        f_x: Float[Tensor, "batch d_sae"],
        x_hat_n: Float[Tensor, "batch d_vit"],
    ) -> Tensor:
        return _mse(x_n, x_hat_n)

    def sparsity_penalty(self, pre: Float[Tensor, "batch d_sae"], f_x: Float[Tensor, "batch d_sae"]) -> Tensor:
        """Unweighted penalty, averaged over the batch (the caller multiplies by coefficient and warm-up)."""
        return f_x.new_zeros(())

    def aux_loss(
        self,
        x_n: Float[Tensor, "batch d_vit"],
        pre: Float[Tensor, "batch d_sae"],
        x_hat_n: Float[Tensor, "batch d_vit"],
    ) -> Tensor:
        return x_n.new_zeros(())

    @torch.no_grad()
    def update_stats(self, f_x: Float[Tensor, "batch d_sae"]) -> None:
        """Called by forward in training mode after the loss: running statistics (dead latents, thresholds)."""
        self.n_patches_since_fired += f_x.shape[0]
        self.n_patches_since_fired[(f_x > 0).any(dim=0)] = 0

    def dead_latents(self) -> Tensor:
        """[d_sae] bool: latents that have not fired in the last ``dead_after_n_patches`` training patches."""
        return self.n_patches_since_fired >= self.dead_after_n_patches

    # -- optimiser hooks --------------------------------------------------------------------------------------

    def before_optimizer_step(self) -> None:
        """Call after backward(), before optimizer.step()."""

    def after_optimizer_step(self) -> None:
        """Call after optimizer.step()."""

    @torch.no_grad()
    def normalize_w_dec(self) -> None:
        """Scale every decoder row to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove the part of W_dec.grad parallel to each decoder row (so a step does not just change norms)."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        parallel = (g * w).sum(dim=1, keepdim=True) / (w * w).sum(dim=1, keepdim=True).clamp_min(1e-12)
        g -= parallel * w


class UnitNormDecoder(SparseAutoencoder):
    """Keeps decoder rows at unit norm: parallel-gradient removal before each step, renormalisation after."""

    def before_optimizer_step(self) -> None:
        self.remove_parallel_grads()

    def after_optimizer_step(self) -> None:
        self.normalize_w_dec()


class ReluSAE(UnitNormDecoder):
    """saev 0.1.0: ``f = relu((x_n - b_dec) @ W_enc + b_enc)``, loss = mse + coeff * L1(f), unit-norm decoder."""

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        torch.nn.init.kaiming_uniform_(self.W_enc, generator=gen)
        torch.nn.init.kaiming_uniform_(self.W_dec, generator=gen)
        self.normalize_w_dec()

    def sparsity_penalty(self, pre, f_x):
        return f_x.abs().sum(dim=-1).mean()


class ReluDecNormSAE(SparseAutoencoder):
    """Anthropic, April 2024: ``f = relu(x_n @ W_enc + b_enc)`` (no pre-encoder bias), L1 weighted by decoder row
    norms, no norm constraint; decoder rows start at norm ``decoder_init_norm`` and W_enc at W_dec.T."""

    @property
    def init_decoder_norm(self) -> float:
        return self.cfg.decoder_init_norm

    def pre_acts(self, x_n):
        return x_n @ self.W_enc + self.b_enc

    def sparsity_penalty(self, pre, f_x):
        return (f_x * self.W_dec.norm(dim=1)).sum(dim=-1).mean()


class TopKSAE(UnitNormDecoder):
    """Gao et al. 2024: keep the k largest relu'd pre-activations of each row (exactly k non-zeros when the k
    largest are positive; fewer otherwise), plus AuxK over the ``dead_latents()``. With ``n_prefixes > 1`` it is a
    Matryoshka SAE.
    """

    sparse_training = False
    """Train through ``saev_core.nn.sparse_topk`` (the trainer sets it): the dense forward's loss and gradients with
    only the encoder's forward matmul dense."""

    def __init__(self, cfg: config.SparseAutoencoderConfig):
        super().__init__(cfg)
        self.prefix_sizes = matryoshka_prefix_sizes(cfg.d_sae, cfg.n_prefixes)

    def forward(self, x):
        if not (self.training and self.sparse_training):
            return super().forward(x)
        x_hat_n, f_x, mse, aux = sparse_topk.train_forward(self, x)
        sparsity = mse.new_zeros(())
        self.update_stats(f_x)
        return Output(self.denormalize(x_hat_n), f_x, Loss(mse, sparsity, aux, mse + sparsity + aux))

    def activate(self, pre):
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def reconstruction_mse(self, x_n, f_x, x_hat_n):
        if len(self.prefix_sizes) == 1:
            return _mse(x_n, x_hat_n)
        # Each prefix reconstructs alone; build them cumulatively instead of re-multiplying the first latents.
        mses, start, x_hat_prefix = [], 0, self.b_dec.expand_as(x_n)
        for m in self.prefix_sizes:
            x_hat_prefix = x_hat_prefix + f_x[:, start:m] @ self.W_dec[start:m]
            mses.append(_mse(x_n, x_hat_prefix))
            start = m
        return torch.stack(mses).mean()

    def aux_loss(self, x_n, pre, x_hat_n):
        """AuxK: the top-k_aux dead latents reconstruct the (detached) residual, as a fraction of its variance."""
        dead = self.dead_latents()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.cfg.auxk_alpha == 0:
            return x_n.new_zeros(())
        # Live latents are masked to -inf before the top-k, so gradient reaches dead latents' weights only.
        vals, idx = torch.where(dead, pre, -torch.inf).topk(min(self.cfg.k_aux, n_dead), dim=-1)
        f_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        residual = (x_n - x_hat_n).detach()
        variance = (residual - residual.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return self.cfg.auxk_alpha * (f_aux @ self.W_dec - residual).pow(2).sum() / variance


class BatchTopKSAE(TopKSAE):
    """Bussmann et al. 2024: in training keep the batch * k largest activations of the whole batch; in eval mode
    act as JumpReLU with one global ``threshold`` buffer, a running mean (weight ``THRESHOLD_EMA``) of the smallest
    kept activation per training batch (the first batch sets it)."""

    def __init__(self, cfg: config.SparseAutoencoderConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))

    def activate(self, pre):
        if not self.training:
            return pre.relu() * (pre > self.threshold)
        flat = pre.flatten()
        vals, idx = flat.topk(self.cfg.k * pre.shape[0])
        return torch.zeros_like(flat).scatter(0, idx, vals.relu()).view_as(pre)

    @torch.no_grad()
    def update_stats(self, f_x):
        super().update_stats(f_x)
        kept = f_x[f_x > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        ema = (1 - THRESHOLD_EMA) * self.threshold + THRESHOLD_EMA * smallest
        self.threshold.copy_(torch.where(self.threshold > 0, ema, smallest))


class _JumpReLU(torch.autograd.Function):
    """relu(pre) * H(pre - threshold); the threshold's gradient is the rectangle-kernel pseudo-derivative."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre.relu() * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_pre = grad * ((pre > threshold) & (pre > 0))
        grad_threshold = (-(threshold / eps) * in_window * grad).sum(dim=0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - threshold); no gradient to pre, rectangle-kernel pseudo-derivative to the threshold."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return torch.zeros_like(pre), (-(1 / eps) * in_window * grad).sum(dim=0), None


class JumpReluSAE(UnitNormDecoder):
    """Rajamanoharan et al. 2024: ``f = relu(pre) * H(pre - threshold)`` with a learned raw ``threshold [d_sae]``
    (a parameter); L0 penalty ``sum H(pre - threshold)``; straight-through estimator of width jumprelu_bandwidth."""

    def __init__(self, cfg: config.SparseAutoencoderConfig):
        super().__init__(cfg)
        self.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold)))

    def activate(self, pre):
        return _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)

    def sparsity_penalty(self, pre, f_x):
        return _Step.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(dim=-1).mean()


ARCHS: dict[str, type[SparseAutoencoder]] = {
    "relu": ReluSAE,
    "relu-decnorm": ReluDecNormSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReluSAE,
}


def matryoshka_prefix_sizes(d_sae: int, n_prefixes: int) -> tuple[int, ...]:
    """Geometric nested prefixes, each twice the previous: d_sae/2^(n-1), ..., d_sae/2, d_sae (floored)."""
    return tuple(d_sae >> (n_prefixes - i) for i in range(1, n_prefixes + 1))


def check_config(cfg: config.SparseAutoencoderConfig) -> None:
    """Raise UserError for settings no variant can train with."""

    def bad(field: str, value, fix: str) -> UserError:
        return UserError(f"SAE config: {field}={value!r} is invalid: {fix}")

    if cfg.arch not in ARCHS:
        raise bad("arch", cfg.arch, f"choose one of {', '.join(ARCHS)}.")
    for field in ("d_vit", "exp_factor"):
        if getattr(cfg, field) < 1:
            raise bad(field, getattr(cfg, field), "use a positive integer.")
    if cfg.sparsity_coeff < 0:
        raise bad("sparsity_coeff", cfg.sparsity_coeff, "use a coefficient >= 0.")
    if cfg.n_prefixes < 1:
        raise bad("n_prefixes", cfg.n_prefixes, "use 1 (no Matryoshka) or more.")
    if cfg.n_prefixes > 1 and cfg.arch not in ("topk", "batchtopk"):
        fix = f"Matryoshka needs arch topk or batchtopk (got {cfg.arch}); set n_prefixes=1."
        raise bad("n_prefixes", cfg.n_prefixes, fix)
    if cfg.n_prefixes > 1 and cfg.d_sae >> (cfg.n_prefixes - 1) < 1:
        fix = f"prefixes halve in size and d_sae={cfg.d_sae} is too small for that many; use fewer."
        raise bad("n_prefixes", cfg.n_prefixes, fix)
    if cfg.arch in ("topk", "batchtopk"):
        if not 1 <= cfg.k <= cfg.d_sae:
            raise bad("k", cfg.k, f"use 1 <= k <= d_sae ({cfg.d_sae}).")
        if cfg.k_aux < 1:
            raise bad("k_aux", cfg.k_aux, "use k_aux >= 1 (set auxk_alpha=0 to turn AuxK off).")
        if cfg.auxk_alpha < 0:
            raise bad("auxk_alpha", cfg.auxk_alpha, "use a weight >= 0.")
    if cfg.dead_after_n_patches is not None and cfg.dead_after_n_patches < 1:
        raise bad("dead_after_n_patches", cfg.dead_after_n_patches, "use a positive number of patches (or None).")
    if cfg.arch == "jumprelu" and cfg.jumprelu_bandwidth <= 0:
        raise bad("jumprelu_bandwidth", cfg.jumprelu_bandwidth, "use a positive width such as 0.001.")
    if cfg.arch == "relu-decnorm" and cfg.decoder_init_norm <= 0:
        raise bad("decoder_init_norm", cfg.decoder_init_norm, "use a positive norm such as 0.1.")


def make_sae(cfg: config.SparseAutoencoderConfig) -> SparseAutoencoder:
    """The variant ``cfg.arch`` names, initialised on the CPU from ``cfg.seed`` (same seed, same weights)."""
    check_config(cfg)
    return ARCHS[cfg.arch](cfg)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def ckpt_file(path: str | os.PathLike) -> str:
    """The checkpoint file a path names: ``path`` itself, or ``path/sae.pt`` for a member's folder."""
    path = os.fspath(path)
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def dump(path: str | os.PathLike, sae: SparseAutoencoder, provenance: dict | None = None) -> str:
    """Write ``sae`` atomically to ``path`` (a file, or a folder that gets ``sae.pt``); returns the file's path.

    ``provenance`` (store key, layer, token mode, ViT...) is merged over ``sae.provenance``; values that are not
    JSON are written as strings.
    """
    path = ckpt_file(path)
    header = {
        "schema": SCHEMA,
        "arch": sae.cfg.arch,
        "cfg": dataclasses.asdict(sae.cfg),
        "d_vit": sae.cfg.d_vit,
        "d_sae": sae.cfg.d_sae,
        "provenance": {**sae.provenance, **(provenance or {})},
    }
    state = {key: value.detach().cpu() for key, value in sae.state_dict().items()}
    def write(f) -> None:
        f.write((json.dumps(header, default=str) + "\n").encode())
        torch.save(state, f)

    atomic_write(path, write)
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read a checkpoint written by ``dump`` or by saev 0.1.0; returns the SAE in eval mode on ``device``.

    Nothing is allocated before the header's sizes agree with the tensors in the file, and the tensors are read
    with torch's ``weights_only`` unpickler alone (a file that needs more is refused, never run)."""
    path = ckpt_file(path)
    not_ckpt = _not_checkpoint(path)
    try:
        with open(path, "rb") as f:
            header = _read_header(f, not_ckpt)
            cfg, legacy = _cfg_from_header(header, not_ckpt)
            state = _read_state_dict(f, device, not_ckpt)
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror or err}. Check the path and its permissions.") from None

    provenance = header.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise not_ckpt(f"the header's provenance is {type(provenance).__name__}, not a JSON object")
    _check_sizes(cfg, state, not_ckpt)  # before make_sae allocates d_vit x d_sae twice
    try:
        sae = make_sae(cfg)
    except UserError as err:  # settings no variant trains with (k > d_sae...)
        raise not_ckpt(f"the header's cfg: {err}") from None
    # Firing counters are training state: files from before every variant kept them load with zeros.
    optional = {"mean", "scale", "n_patches_since_fired"} if legacy else {"n_patches_since_fired"}
    try:
        missing, unexpected = sae.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise not_ckpt(f"weights do not match the header: {err}") from None
    if unexpected or set(missing) - optional:
        raise not_ckpt(f"state dict keys do not match arch {cfg.arch}: missing {missing}, unexpected {unexpected}")
    sae.provenance = dict(provenance)
    return sae.to(device).eval()


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance in a checkpoint's header line, without reading its weights ({} for a saev 0.1.0 file)."""
    path = ckpt_file(path)
    not_ckpt = _not_checkpoint(path)
    try:
        with open(path, "rb") as f:
            header = _read_header(f, not_ckpt)
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror or err}. Check the path and its permissions.") from None
    provenance = header.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise not_ckpt(f"the header's provenance is {type(provenance).__name__}, not a JSON object")
    return dict(provenance)


def _not_checkpoint(path: str):
    """The UserError maker for ``path``'s problems; raises at once when there is no file at all."""
    expected = "expected an SAE checkpoint: a JSON header line, then a torch state dict (saev-dagster or saev 0.1.0)"

    def not_ckpt(why: str) -> UserError:
        return UserError(f"{path} is not an SAE checkpoint ({why}); {expected}.")

    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; {expected}.")
    return not_ckpt


def _read_header(f, not_ckpt) -> dict:
    """The JSON object on a checkpoint's first line (at most _MAX_HEADER_BYTES)."""
    line = f.readline(_MAX_HEADER_BYTES)
    if not line.endswith(b"\n"):
        raise not_ckpt("empty file" if not line else "no header line")
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise not_ckpt(f"the first line is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise not_ckpt("the header is not a JSON object")
    return header


def _read_state_dict(f, device, not_ckpt) -> dict:
    """The state dict after the header, read by torch's weights-only unpickler. Torch's own message for a refused
    file advises turning that safety off; it must never reach the user, so it is replaced, not passed on."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on pickle protocols are not the user's business
            state = torch.load(f, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise not_ckpt("the data after the header holds Python objects other than tensors, which could run code "
                       "when loaded; this loader reads plain tensors only. Re-save the weights as a plain state dict "
                       "of tensors (nn.dump does)") from None
    except Exception as err:
        # torch's first sentence says what failed; the rest is advice (some of it unsafe) for programmers.
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err):
            first = type(err).__name__
        raise not_ckpt(f"no readable state dict after the header: the file is cut short or damaged ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise not_ckpt("the data after the header is not a state dict of named tensors")
    return state


def _check_sizes(cfg: config.SparseAutoencoderConfig, state: dict, not_ckpt) -> None:
    """The weights' shapes the header's d_vit and d_sae imply, against the tensors actually in the file."""
    want = {"W_enc": (cfg.d_vit, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_vit), "b_enc": (cfg.d_sae,),
            "b_dec": (cfg.d_vit,)}
    for name, shape in want.items():
        if name not in state:
            raise not_ckpt(f"the state dict has no {name}")
        if tuple(state[name].shape) != shape:
            raise not_ckpt(f"the header says d_vit={cfg.d_vit}, d_sae={cfg.d_sae}, so {name} should be "
                           f"{list(shape)}, but the file holds {list(state[name].shape)}")


def _cfg_from_header(header: dict, not_ckpt) -> tuple[config.SparseAutoencoderConfig, bool]:
    """The config a header describes, and whether it is a saev 0.1.0 header; every field's type and range checked."""
    if "schema" in header:
        if header["schema"] != SCHEMA:
            raise not_ckpt(f"schema {header['schema']!r} is not supported (this version reads schema {SCHEMA})")
        fields = header.get("cfg")
        if not isinstance(fields, dict):
            raise not_ckpt(f"the header's cfg is {type(fields).__name__}, not a JSON object")
        return _typed_cfg(fields, "cfg.", not_ckpt), False
    if "d_vit" in header and "exp_factor" in header:  # saev 0.1.0: the relu recipe, identity normalisation.
        fields = {"d_vit": header["d_vit"], "exp_factor": header["exp_factor"], "arch": "relu",
                  **{k: header[k] for k in ("sparsity_coeff", "seed") if k in header}}
        return _typed_cfg(fields, "", not_ckpt), True
    raise not_ckpt("the header has neither 'schema' nor saev 0.1.0's 'd_vit' and 'exp_factor'")


def _typed_cfg(fields: dict, where: str, not_ckpt) -> config.SparseAutoencoderConfig:
    import typing

    from saev_core.train.sweep import coerce, describe_type

    hints = typing.get_type_hints(config.SparseAutoencoderConfig)
    changes = {}
    for key, value in fields.items():
        if key not in hints:
            raise not_ckpt(f"the header's {where}{key} is not a field of this version's SAE config")
        try:
            changes[key] = coerce(value, hints[key])
        except TypeError:
            raise not_ckpt(f"the header's {where}{key} = {value!r} is not {describe_type(hints[key])}") from None
    try:
        return config.SparseAutoencoderConfig(**changes)
    except UserError as err:
        raise not_ckpt(f"the header's {where.rstrip('.') or 'fields'}: {err}") from None
