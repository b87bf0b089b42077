"""Which latents a visuals run renders: those asked for by id, a seeded draw among the latents whose frequency and
mean value lie in the selection's ranges, and every latent the page's class and probe tables name."""

import logging

import numpy as np
from jaxtyping import Int

from saev_core.errors import UserError
from saev_core.visuals import patch_classes
from saev_core.visuals.topk_cache import TopKCache

logger = logging.getLogger("saev_core.visuals.selection")


def select_latents(
    cache: TopKCache,
    log_freq_range: tuple[float, float],
    log_value_range: tuple[float, float],
    include_latents=(),
    n_latents: int = 400,
    seed: int = 42,
    linked=(),
) -> Int[np.ndarray, " n"]:
    """``include_latents`` (in the given order), then up to ``n_latents`` others drawn at random (seeded) among the
    latents whose log10 frequency and log10 mean value lie in the closed ranges, in id order, then the ``linked``
    latents (those the page's class and probe tables name) not already there, in id order: the draw is the same
    with or without them. Dead latents (never fired) are never selected: an included one is skipped with a
    warning."""
    alive = cache.freq > 0
    bad = [i for i in include_latents if not 0 <= i < cache.d_sae]
    if bad:
        raise UserError(f"--include-latents {bad} are not latents of this SAE (ids 0..{cache.d_sae - 1}).")
    dead = [i for i in include_latents if not alive[i]]
    if dead:
        logger.warning("--include-latents %s never fire on this layer; they are left out", dead)
    included = list(dict.fromkeys(i for i in include_latents if alive[i]))
    with np.errstate(divide="ignore"):
        log_freq, log_value = np.log10(cache.freq), np.log10(cache.mean_value)
    passes = (
        alive
        & (log_freq >= log_freq_range[0])
        & (log_freq <= log_freq_range[1])
        & (log_value >= log_value_range[0])
        & (log_value <= log_value_range[1])
    )
    passes[included] = False
    candidates = np.flatnonzero(passes)
    picked = np.random.default_rng(seed).choice(candidates, size=min(n_latents, len(candidates)), replace=False)
    chosen = [*included, *np.sort(picked).tolist()]
    extra = sorted(set(int(j) for j in linked if alive[j]) - set(chosen))
    return np.array(chosen + extra, dtype=np.int64)


def linked_latents(cache: TopKCache, class_latents: dict | None, probe: patch_classes.ProbeView | None) -> list[int]:
    """The latents that the class table and the probe section name and that fire (so they have heatmaps), in
    increasing id order: the page renders all of them, whatever the selection ranges."""
    named = {j for best in (class_latents or {}).values() for j, _ in best}
    named |= set(probe.best_latents() if probe else [])
    return sorted(j for j in named if cache.freq[j] > 0)
