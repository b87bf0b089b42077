"""The SAE variants, one class per recipe, and ``make_sae``, which builds the one a config names.

relu (saev 0.1.0), relu-decnorm (Anthropic, April 2024), topk with AuxK and Matryoshka prefixes (Gao et al. 2024),
batchtopk (Bussmann et al. 2024), jumprelu (Rajamanoharan et al. 2024). Each chooses only what differs from the base
in ``nn.sae``: the activation, the sparsity penalty, the auxiliary loss and the optimiser hooks.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config
from saev_core.nn import sparse_topk
from saev_core.nn.sae import Loss, Output, SparseAutoencoder, check_config, mean_squared_error

THRESHOLD_EMA = 0.01
"""BatchTopK: weight of each step's minimum kept activation in the running threshold (Bussmann et al. 2024)."""
CALIBRATION_SHARE = 4
"""BatchTopK calibration: each batch offers this many times its share (k per vector) of its largest values."""


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
            return mean_squared_error(x_n, x_hat_n)
        # Each prefix reconstructs alone; build them cumulatively instead of re-multiplying the first latents.
        mses, start, x_hat_prefix = [], 0, self.b_dec.expand_as(x_n)
        for m in self.prefix_sizes:
            x_hat_prefix = x_hat_prefix + f_x[:, start:m] @ self.W_dec[start:m]
            mses.append(mean_squared_error(x_n, x_hat_prefix))
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
    act as JumpReLU with one global ``threshold`` buffer. During training the threshold is a running mean (weight
    ``THRESHOLD_EMA``) of the smallest kept activation per batch; at the end the trainer sets it with
    ``calibrate_threshold`` on a sample of the training stream, so that inference keeps k latents per vector on
    average as training did (the running mean lags behind a short run: held-out L0 fell to 6 for k = 8)."""

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

    @torch.no_grad()
    def calibrate_threshold(self, batches: list[Float[Tensor, "_batch d_vit"]]) -> dict[str, float]:
        """Set the inference threshold to the (n * k)-th largest pre-activation over the n raw vectors of
        ``batches``: the global version of training's batch top-k, so that the mean L0 at inference is k on data
        like these. Returns the threshold and the training-mode L0 (batch top-k, per batch) on the same vectors.

        Each batch contributes its ``CALIBRATION_SHARE`` * k * batch largest values: of shuffled batches none holds
        that many times its share of the global top n * k, and the memory stays a few values per vector."""
        n, tops, l0_train = 0, [], 0.0
        for x in batches:
            pre = self.pre_acts(self.normalize(x)).flatten()
            top = pre.topk(min(CALIBRATION_SHARE * self.cfg.k * len(x), pre.numel())).values  # sorted, largest first
            l0_train += float(top[: self.cfg.k * len(x)].gt(0).sum())
            tops.append(top)
            n += len(x)
        if not tops:
            return {"threshold": float(self.threshold), "l0_train": float("nan")}
        values = torch.cat(tops)
        threshold = float(values.topk(min(self.cfg.k * n, values.numel()), sorted=False).values.min().clamp(min=0))
        self.threshold.fill_(threshold)
        return {"threshold": threshold, "l0_train": l0_train / n}


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


def make_sae(cfg: config.SparseAutoencoderConfig) -> SparseAutoencoder:
    """The variant ``cfg.arch`` names, initialised on the CPU from ``cfg.seed`` (same seed, same weights)."""
    check_config(cfg)
    return ARCHS[cfg.arch](cfg)
