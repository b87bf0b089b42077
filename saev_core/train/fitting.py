"""Settings that depend on the run: a run's unset ``lr``, ``n_lr_warmup`` and ``sae.dead_after_n_patches`` fitted to
its length (``fit_to_run``). The CPU threads it trains with are chosen while it runs (``saev_core.threads``).

Kept apart from the loop because they are decided once, before any data is read, and are reported to the user (the
trainer logs the notes ``fit_to_run`` returns for the members it trains); docs/training.md explains each rule.
"""

import dataclasses
import math

from saev_core import config, nn

AUTO_LR = 4e-4
"""``lr`` left unset: saev 0.1.0's default learning rate for saev's default run (``AUTO_LR_D_SAE`` latents over
``AUTO_LR_STEPS`` steps), scaled up for narrower SAEs and shorter runs (``auto_lr``)."""
AUTO_LR_D_SAE = 16_384
"""d_sae of saev's (and our) default SAE: d_vit 1024 x 16."""
AUTO_LR_STEPS = 100_000_000 // 16_384
"""Steps of saev's (and our) default run: 100M patches in batches of 16,384."""
MAX_AUTO_LR = 1e-2
NOMINAL_N_LR_WARMUP = 500
"""``n_lr_warmup`` left unset: this, or ``MAX_AUTO_WARMUP_FRACTION`` of the steps when that is less."""
MAX_AUTO_WARMUP_FRACTION = 0.05
MAX_AUTO_DEAD_FRACTION = 0.10
"""``sae.dead_after_n_patches`` left unset: at most this fraction of ``n_patches``."""


def auto_lr(d_sae: int, n_steps: int) -> float:
    """The learning rate ``lr`` None stands for: ``AUTO_LR * sqrt(AUTO_LR_D_SAE / d_sae) *
    max(1, AUTO_LR_STEPS / n_steps) ** 0.25``, at most ``MAX_AUTO_LR``.

    saev's 4e-4 for saev's default run; 1/sqrt(d_sae) is the width rule of EleutherAI's sparsify and of
    dictionary_learning; the run-length factor lets a short run move the decoder far enough (measured on the
    planted benchmark and the demo, docs/benchmarks.md: 4e-4 fails both)."""
    lr = AUTO_LR * math.sqrt(AUTO_LR_D_SAE / d_sae) * max(1.0, AUTO_LR_STEPS / n_steps) ** 0.25
    return min(MAX_AUTO_LR, lr)


def fit_to_run(cfg: config.TrainConfig) -> tuple[config.TrainConfig, list[str]]:
    """``cfg`` with its unset settings (None) filled in for this run, and notes on what the run chose or on
    explicit settings that do not fit it.

    ``lr`` None: ``auto_lr(d_sae, steps)``. ``n_lr_warmup`` None: ``NOMINAL_N_LR_WARMUP`` steps, at most 5% of the
    steps (at least 1). ``sae.dead_after_n_patches`` None: ``nn.NOMINAL_DEAD_AFTER_N_PATCHES``, at most 10% of
    ``n_patches``. Values set explicitly are kept; a warm-up longer than the run, or a dead window longer than the
    patches seen, gets a note saying what it does to this run. A fitted config fits to itself, without notes.
    """
    n_steps = cfg.n_patches // cfg.sae_batch_size if cfg.sae_batch_size > 0 else 0
    if n_steps < 1:
        return cfg, []  # train_group says what is wrong
    n_seen = n_steps * cfg.sae_batch_size
    notes = []
    lr = cfg.lr
    if lr is None:
        lr = auto_lr(cfg.sae.d_sae, n_steps)
        if lr != AUTO_LR:
            notes.append(
                f"--lr is not set: using {lr:.3g} for d_sae {cfg.sae.d_sae} over {n_steps} steps (saev's {AUTO_LR:g} "
                f"for d_sae {AUTO_LR_D_SAE} over {AUTO_LR_STEPS} steps, scaled; docs/training.md). Pass --lr to choose."
            )
    warmup = cfg.n_lr_warmup
    if warmup is None:
        warmup = min(NOMINAL_N_LR_WARMUP, max(1, int(MAX_AUTO_WARMUP_FRACTION * n_steps)))
        if warmup < NOMINAL_N_LR_WARMUP:
            usual = (
                f"are longer than this run ({n_steps} steps)"
                if NOMINAL_N_LR_WARMUP >= n_steps
                else f"would be {NOMINAL_N_LR_WARMUP / n_steps:.0%} of this run's {n_steps} steps"
            )
            notes.append(
                f"--n-lr-warmup is not set, and its usual {NOMINAL_N_LR_WARMUP} steps {usual}: warming up over "
                f"{warmup} steps (5%) instead. Pass --n-lr-warmup to choose."
            )
    elif warmup > n_steps:
        notes.append(
            f"--n-lr-warmup {warmup} is longer than the run ({n_steps} steps): the learning rate only reaches "
            f"{lr * n_steps / warmup:.3g}, not --lr {lr:.3g}. Kept as set; leave it unset to fit it to the run."
        )
    if cfg.n_sparsity_warmup > n_steps and cfg.sae.arch in ("relu", "relu-decnorm", "jumprelu"):
        notes.append(
            f"--n-sparsity-warmup {cfg.n_sparsity_warmup} is longer than the run ({n_steps} steps): the sparsity "
            f"coefficient only reaches {n_steps / cfg.n_sparsity_warmup:.0%} of --sae.sparsity-coeff. Kept as set."
        )
    dead = cfg.sae.dead_after_n_patches
    if dead is None:
        dead = min(nn.NOMINAL_DEAD_AFTER_N_PATCHES, max(1, int(MAX_AUTO_DEAD_FRACTION * cfg.n_patches)))
        if dead < nn.NOMINAL_DEAD_AFTER_N_PATCHES:
            notes.append(
                f"--sae.dead-after-n-patches is not set, and its usual {nn.NOMINAL_DEAD_AFTER_N_PATCHES:,} exceeds "
                f"10% of the {cfg.n_patches:,} patches of this run: a latent counts as dead after {dead:,} patches "
                f"without firing instead. Pass --sae.dead-after-n-patches to choose."
            )
    elif dead > n_seen:
        auxk = " and AuxK never acts" if cfg.sae.arch in ("topk", "batchtopk") else ""
        notes.append(
            f"--sae.dead-after-n-patches {dead:,} exceeds the {n_seen:,} patches this run sees: no latent can count "
            f"as dead (frac_dead_train is 0{auxk}). Kept as set; leave it unset to fit it to the run."
        )
    fitted = dataclasses.replace(
        cfg, lr=lr, n_lr_warmup=warmup, sae=dataclasses.replace(cfg.sae, dead_after_n_patches=dead)
    )
    return fitted, notes
