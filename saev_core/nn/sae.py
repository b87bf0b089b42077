"""The protocol every SAE variant follows, ``x_hat, f_x, loss = sae(x)``, and the base class that implements it.

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
"""

import typing
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config
from saev_core.errors import UserError

NOMINAL_DEAD_AFTER_N_PATCHES = 10_000_000
"""``dead_after_n_patches`` left unset (None): this, unless the trainer fits it to a shorter run."""
ARCH_NAMES: tuple[str, ...] = typing.get_args(config.SaeArch)
"""The variants a config may name; ``variants.ARCHS`` maps each to its class (this module cannot import them: they
subclass its base)."""


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


def mean_squared_error(x: Float[Tensor, "batch d_vit"], x_hat: Float[Tensor, "batch d_vit"]) -> Tensor:
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
        self.dead_after_n_patches = (
            NOMINAL_DEAD_AFTER_N_PATCHES if cfg.dead_after_n_patches is None else cfg.dead_after_n_patches
        )
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
        return mean_squared_error(x_n, x_hat_n)

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


def check_config(cfg: config.SparseAutoencoderConfig) -> None:
    """Raise UserError for settings no variant can train with."""

    def bad(field: str, value, fix: str) -> UserError:
        return UserError(f"SAE config: {field}={value!r} is invalid: {fix}")

    if cfg.arch not in ARCH_NAMES:
        raise bad("arch", cfg.arch, f"choose one of {', '.join(ARCH_NAMES)}.")
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
