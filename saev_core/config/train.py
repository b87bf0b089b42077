"""The configs of training: one SAE (``SparseAutoencoderConfig``), the activations it reads (``DataLoadConfig``),
and the run (``TrainConfig``)."""

import dataclasses
from typing import Literal

from saev_core.config.fields import ANY, AT_LEAST_0, AT_LEAST_1, POSITIVE, SEED, check_fields
from saev_core.config.machine import Device

SaeArch = Literal["relu", "relu-decnorm", "topk", "batchtopk", "jumprelu"]


@dataclasses.dataclass(frozen=True)
class SparseAutoencoderConfig:
    """One flat SAE config: ``arch`` picks the variant; fields a variant does not use are ignored by it."""

    d_vit: int = 1024
    """Input width: the ViT's residual-stream width."""
    exp_factor: int = 16
    """d_sae = d_vit * exp_factor."""
    arch: SaeArch = "relu"
    """relu (saev 0.1.0: L1, unit-norm decoder), relu-decnorm (L1 weighted by decoder norms), topk (+AuxK),
    batchtopk (global threshold at inference), jumprelu (straight-through threshold)."""
    sparsity_coeff: float = 4e-4
    """Weight of the sparsity penalty against the MSE averaged over batch and d_vit, as in saev 0.1.0 (so saev's
    values give saev's L0): L1 (relu), decoder-norm-weighted L1 (relu-decnorm) or L0 (jumprelu) per vector.
    Unused by topk and batchtopk. docs/training.md defines every loss term."""
    k: int = 32
    """Active latents per vector (topk, batchtopk)."""
    n_prefixes: int = 1
    """Matryoshka: number of nested prefixes (> 1 turns it on; topk and batchtopk only)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK dead-latent loss (topk, batchtopk)."""
    k_aux: int = 512
    """Dead latents used by AuxK."""
    dead_after_n_patches: int | None = None
    """A latent that has not fired in this many training patches is dead (AuxK's dead latents, and the count
    frac_dead_train). None: 10,000,000, or 10% of --n-patches when that is less (logged)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold (raw, not log)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the straight-through estimator's window."""
    decoder_init_norm: float = 0.1
    """Initial decoder row norm (relu-decnorm)."""
    seed: int = 0
    """Weight-initialisation seed; a sweep gives member i the seed base + i."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--sae.",
            {
                "d_vit": AT_LEAST_1,
                "exp_factor": AT_LEAST_1,
                "sparsity_coeff": AT_LEAST_0,
                "k": AT_LEAST_1,
                "n_prefixes": AT_LEAST_1,
                "auxk_alpha": AT_LEAST_0,
                "k_aux": AT_LEAST_1,
                "dead_after_n_patches": AT_LEAST_1,
                "jumprelu_init_threshold": ANY,
                "jumprelu_bandwidth": POSITIVE,
                "decoder_init_norm": POSITIVE,
                "seed": SEED,
            },
        )

    @property
    def d_sae(self) -> int:
        return self.d_vit * self.exp_factor


@dataclasses.dataclass(frozen=True)
class DataLoadConfig:
    """Which activations to train on and how to normalise them."""

    shard_root: str = "./shards"
    """Activation store path or URL (the last line `activations` prints)."""
    layer: int = -2
    """Layer to read, as recorded (-2) or resolved (10)."""
    patches: Literal["patches", "cls", "meanpool"] = "patches"
    """patches: every patch vector; cls: the CLS token; meanpool: the mean of an image's patches."""
    scale_mean: bool = True
    """Subtract the mean over all valid images of the layer (cached in the store, saved in every SAE checkpoint)."""
    scale_norm: bool = True
    """Scale so that E||x - mean||^2 = d_vit (stored like the mean)."""
    val_frac: float = 0.1
    """Fraction of images (not patches) held out for evaluation."""
    buffer_chunks: int = 32
    """Store chunks held in the shuffle buffer."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--data.",
            {
                "layer": ANY,
                "val_frac": ("in [0, 1)", lambda v: 0 <= v < 1),
                "buffer_chunks": AT_LEAST_1,
            },
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train one SAE, or a sweep of SAEs in one pass over the data."""

    data: DataLoadConfig = dataclasses.field(default_factory=DataLoadConfig)
    """Which activations to train on (--data.*)."""
    sae: SparseAutoencoderConfig = dataclasses.field(default_factory=SparseAutoencoderConfig)
    """The SAE (--sae.*); a sweep varies these per member."""
    n_patches: int = 100_000_000
    """Training vectors to read (sae_batch_size per step; epochs over the store cycle as needed)."""
    sae_batch_size: int = 16_384
    """Vectors per SAE step."""
    lr: float | None = None
    """Peak learning rate. None: saev's 4e-4 for the default SAE and run (d_sae 16,384, 6,103 steps), times
    sqrt(16384 / d_sae) and (6103 / steps)^(1/4) for narrower SAEs and shorter runs, at most 1e-2 (logged)."""
    n_lr_warmup: int | None = None
    """Linear learning-rate warm-up steps (then linear decay to 0). None: 500, or 5% of the steps when that is less
    (logged)."""
    n_sparsity_warmup: int = 0
    """Linear sparsity-coefficient warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm per SAE)."""
    sweep: str | None = None
    """A TOML file of lists to sweep over ([sae], [data] tables and top-level keys)."""
    ckpt_path: str = "./checkpoints"
    """Where checkpoints go: <ckpt_path>/<member_id>/sae.pt."""
    ckpt_every: int = 1000
    """Steps between periodic checkpoints (for resuming)."""
    log_every: int = 50
    """Steps between metric logs."""
    device: Device = "auto"
    """Where the SAEs train: auto picks cuda when available."""
    n_threads: int | None = None
    """CPU threads for training: torch's intra-op threads during the run; the loader reads with at most 2 of them.
    None: the CPUs this process may use to begin with, one fewer (and so on) while the steps' own timing says it is
    faster, re-checked as the run goes (docs/training.md)."""
    sparse_topk: Literal["auto", "on", "off"] = "auto"
    """topk and batchtopk: train sparsely (only the encoder's forward is a dense matmul; same loss and gradients,
    docs/training.md): auto when k / d_sae <= 1/12, on, or off (the dense reference). Other archs ignore it."""
    seed: int = 42
    """Data-order seed and base of the SAE seeds."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--",
            {
                "n_patches": AT_LEAST_1,
                "sae_batch_size": AT_LEAST_1,
                "lr": POSITIVE,
                "n_lr_warmup": AT_LEAST_0,
                "n_sparsity_warmup": AT_LEAST_0,
                "max_grad_norm": ANY,
                "ckpt_every": AT_LEAST_1,
                "log_every": AT_LEAST_1,
                "n_threads": AT_LEAST_1,
                "seed": SEED,
            },
        )
