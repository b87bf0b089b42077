"""Normalisation statistics of a store layer: one mean vector and one norm scale per (layer, token mode).

They are computed over every valid image of the store, train and val alike: the store keeps one mean and one scale
per (layer, token mode) in ``stats/``, which therefore cannot depend on a split seed or ``val_frac``; the held-out
images lend the SAE two summary numbers of unlabelled data, nothing more. The SAE stores them in its checkpoint and
applies them itself (``sae(x)`` takes raw activations).

The recording writes them (``write_store_stats``, every token mode of every layer in one pass per layer), because
a store is written only by what records it: training reads them, and computes them in memory for a store that
lacks them (one recorded before this rule, or read-only), never writing into the store.
"""

import logging
import math

import numpy as np

from saev_core import config
from saev_core.errors import UserError
from saev_core.store import ActivationStore
from saev_core.store.shards import ChunkReader, stream_chunks
from saev_core.store.tokens import check_token_mode, first_patch, vectors

logger = logging.getLogger("saev_core.store.stats")


def compute_stats(
    store: ActivationStore, layer: int, patches: str, images: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """(mean [d_vit] float64, scale) with E||(x - mean) * scale||^2 = d_vit over the vectors of a token mode.

    ``images`` defaults to every valid image of the store. One pass over whole chunks in order; sums in float64,
    chunk statistics merged with Chan et al.'s parallel update, so a large common offset costs no digits.
    """
    check_token_mode(store, patches)
    mean, scale, _ = compute_all_stats(store, layer, (patches,), images)[patches]
    return mean, scale


def compute_all_stats(
    store: ActivationStore, layer: int, modes: tuple[str, ...], images: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, float, int]]:
    """{token mode: (mean, scale, n_vectors)} for several token modes in ONE pass over the layer's chunks."""
    arr = store.array(layer)
    if images is None:
        images = np.flatnonzero(store.usable_images())
    ipc, first = store.layout.imgs_per_chunk, first_patch(store)
    # The tokens the modes read: a NaN in a patch does not spoil the CLS statistics, and the reverse.
    tokens = slice(0, 1) if set(modes) == {"cls"} else slice(0, None) if "cls" in modes else slice(first, None)
    chunks, starts = np.unique(images // ipc, return_index=True)
    acc = {mode: [0, np.zeros(store.d_vit), 0.0] for mode in modes}  # n, mean, m2
    for c, imgs, x in stream_chunks(ChunkReader(arr), chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
        x = x[imgs - c * ipc]
        finite = np.isfinite(x[:, tokens]).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            bad = int(imgs[np.argmin(finite)])
            raise UserError(
                f"The store {store.path}, layer {layer}, has NaN or Inf activations in image {bad} "
                f"({store.image_paths()[bad]}). Record the layer again (check the ViT checkpoint, and --dtype: "
                "float16 overflows on large activations)."
            )
        for mode, state in acc.items():
            v = vectors(x, mode, first).astype(np.float64)
            mean_c = v.mean(axis=0)
            m2_c = float(np.square(v - mean_c).sum())
            n, mean, m2 = state
            delta, total = mean_c - mean, n + len(v)
            mean += delta * (len(v) / total)
            state[:] = [total, mean, m2 + m2_c + float(delta @ delta) * n * len(v) / total]
    out = {}
    for mode, (n, mean, m2) in acc.items():
        if n == 0:
            raise UserError(f"No vectors to compute statistics on in the store {store.path}, layer {layer}.")
        if m2 == 0:
            raise UserError(
                f"All {n} {mode} vectors of the store {store.path}, layer {layer}, are identical: the store looks "
                "broken. Record it again, or train with --data.no-scale-norm."
            )
        out[mode] = (mean, math.sqrt(store.d_vit * n / m2), n)
    return out


def token_modes(store: ActivationStore) -> tuple[str, ...]:
    return ("patches", "cls", "meanpool") if store.metadata.cls_token else ("patches", "meanpool")


def write_store_stats(store: ActivationStore) -> None:
    """Compute and write the statistics of every token mode of every layer that lacks them (the recording's last
    step; a complete store only)."""
    for layer in store.layers:
        modes = tuple(m for m in token_modes(store) if store.read_stats(layer, m) is None)
        if modes:
            for mode, (mean, scale, n) in compute_all_stats(store, layer, modes).items():
                store.write_stats(layer, mode, mean, scale, n)


def raw_stats(store: ActivationStore, layer: int, patches: str) -> tuple[np.ndarray, float]:
    """(mean, centred scale) of a layer's vectors of one token mode: the store's cached statistics, or one pass
    here for a store without them (not written back: readers write nothing into their input)."""
    cached = store.read_stats(layer, patches)
    if cached is not None:
        return cached
    logger.info(
        "the store %s has no statistics for layer %s (%s): computing them (not written back)",
        store.path,
        layer,
        patches,
    )
    return compute_stats(store, layer, patches)


def set_store_normalization(sae, store: ActivationStore, layer: int, patches: str) -> None:
    """Give an SAE that saved no normalisation (``sae.saved_no_normalization``: saev 0.1.0) the store's, with saev's
    defaults (scale_mean, scale_norm), so its latent values are those it was trained for."""
    import torch

    mean, scale = normalization(store, config.DataLoadConfig(layer=layer, patches=patches))
    sae.set_normalization(torch.as_tensor(mean, dtype=torch.float32), scale)


def normalization(store: ActivationStore, data_cfg: config.DataLoadConfig) -> tuple[np.ndarray, float]:
    """(mean [d_vit] float64, scale) for the SAE: x_n = (x - mean) * scale, as the flags of data_cfg ask.

    scale_mean and scale_norm: E||(x - mean) * scale||^2 = d_vit. No scale_mean: mean = 0 and E||x * scale||^2 =
    d_vit. No scale_norm: scale = 1. The raw statistics come from the store (``stats/``, written by the recording)
    or, for a store without them, from one pass here (not written back: training writes nothing into its input);
    the uncentred scale follows from them, since E||x||^2 = E||x - mean||^2 + ||mean||^2.
    """
    check_token_mode(store, data_cfg.patches)
    d = store.d_vit
    if not data_cfg.scale_mean and not data_cfg.scale_norm:
        return np.zeros(d), 1.0
    mean, scale = raw_stats(store, data_cfg.layer, data_cfg.patches)
    if not data_cfg.scale_mean:
        mean, scale = np.zeros(d), math.sqrt(d / (d / scale**2 + float(mean @ mean)))
    return mean, scale if data_cfg.scale_norm else 1.0
