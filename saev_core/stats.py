"""Normalisation statistics of a store layer: one mean vector and one norm scale per (layer, token mode).

They are computed over every valid image of the store, train and val alike: the store caches one mean and one
scale per (layer, token mode) in ``stats/``, which therefore cannot depend on a split seed or ``val_frac``; the
held-out images lend the SAE two summary numbers of unlabelled data, nothing more. The SAE stores them in its
checkpoint and applies them itself (``sae(x)`` takes raw activations).
"""

import math
import warnings

import numpy as np

from saev_core import config
from saev_core.errors import UserError
from saev_core.shards import ChunkReader, stream_chunks
from saev_core.store import ActivationStore
from saev_core.tokens import check_token_mode, first_patch, vectors, vectors_per_image


def compute_stats(
    store: ActivationStore, layer: int, patches: str, images: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """(mean [d_vit] float64, scale) with E||(x - mean) * scale||^2 = d_vit over the vectors of a token mode.

    ``images`` defaults to every valid image of the store. One pass over whole chunks in order; sums in float64,
    chunk statistics merged with Chan et al.'s parallel update, so a large common offset costs no digits.
    """
    check_token_mode(store, patches)
    arr = store.array(layer)
    if images is None:
        images = np.flatnonzero(store.usable_images())
    ipc, first = store.layout.imgs_per_chunk, first_patch(store)
    tokens = slice(first, None) if patches != "cls" else slice(0, 1)
    chunks, starts = np.unique(images // ipc, return_index=True)
    n, mean, m2 = 0, np.zeros(store.d_vit), 0.0
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
        v = vectors(x, patches, first).astype(np.float64)
        mean_c = v.mean(axis=0)
        m2_c = float(np.square(v - mean_c).sum())
        delta, total = mean_c - mean, n + len(v)
        mean += delta * (len(v) / total)
        m2 += m2_c + float(delta @ delta) * n * len(v) / total
        n = total
    if n == 0:
        raise UserError(f"No vectors to compute statistics on in the store {store.path}, layer {layer}.")
    if m2 == 0:
        raise UserError(
            f"All {n} {patches} vectors of the store {store.path}, layer {layer}, are identical: the store looks "
            "broken. Record it again, or train with --data.no-scale-norm."
        )
    return mean, math.sqrt(store.d_vit * n / m2)



def normalization(store: ActivationStore, data_cfg: config.DataLoadConfig) -> tuple[np.ndarray, float]:
    """(mean [d_vit] float64, scale) for the SAE: x_n = (x - mean) * scale, as the flags of data_cfg ask.

    scale_mean and scale_norm: E||(x - mean) * scale||^2 = d_vit. No scale_mean: mean = 0 and E||x * scale||^2 =
    d_vit. No scale_norm: scale = 1. The raw statistics are computed once per (layer, token mode) and cached in the
    store (``stats/``); the uncentred scale follows from them, since E||x||^2 = E||x - mean||^2 + ||mean||^2.
    """
    check_token_mode(store, data_cfg.patches)
    d = store.d_vit
    if not data_cfg.scale_mean and not data_cfg.scale_norm:
        return np.zeros(d), 1.0
    cached = store.read_stats(data_cfg.layer, data_cfg.patches)
    if cached is None:
        mean, scale = compute_stats(store, data_cfg.layer, data_cfg.patches)
        n = int(store.usable_images().sum()) * vectors_per_image(store, data_cfg.patches)
        _cache_stats(store, data_cfg.layer, data_cfg.patches, mean, scale, n)
    else:
        mean, scale = cached
    if not data_cfg.scale_mean:
        mean, scale = np.zeros(d), math.sqrt(d / (d / scale**2 + float(mean @ mean)))
    return mean, scale if data_cfg.scale_norm else 1.0


def _cache_stats(store: ActivationStore, layer: int, patches: str, mean: np.ndarray, scale: float, n: int) -> None:
    try:
        store.write_stats(layer, patches, mean, scale, n)
        return
    except ValueError:  # opened read-only: open it again for writing
        pass
    try:
        ActivationStore.open(store.path, mode="r+").write_stats(layer, patches, mean, scale, n)
    except (OSError, ValueError) as err:
        warnings.warn(f"Could not cache the statistics of layer {layer} ({patches}) in {store.path}: {err}. "
                      "They will be computed again next time.", stacklevel=2)
