"""Does a store hold what the ViT says? A fresh forward pass over a few sampled images must reproduce their stored
rows: the check that a store was not recorded from other weights, other images or a broken run.

Every block must be marked complete. Non-finite values need no scan: ``ActivationStore.write_block`` refuses a block
with NaN or Inf before marking it, so every complete block is finite.
"""

import numpy as np

from saev_core import config
from saev_core.store import ActivationStore

TOLERANCE = {"float32": 1e-3, "float16": 1e-2}
"""Allowed max |stored - fresh| as a fraction of the sample's max |value|: float32 leaves room for another device's
or another BLAS's rounding (GPU recordings checked on a CPU), float16 for its 11-bit mantissa."""


def store_problems(cfg: config.ActivationsConfig, store_path: str, n_samples: int = 4, seed: int = 0) -> list[str]:
    """What is wrong with the store at ``store_path`` for the recording ``cfg`` (empty: nothing found)."""
    import torch

    from saev_core.record import images
    from saev_core.record import vit as vitlib

    store = ActivationStore.open(store_path)
    missing = store.missing_blocks()
    if missing:
        return [f"blocks {missing[:10]} of {store.path} were never written"]
    valid = np.flatnonzero(store.valid_images())
    if len(valid) == 0:
        return [f"every image of {store.path} is marked invalid"]
    picked = np.sort(np.random.default_rng(seed).choice(valid, min(n_samples, len(valid)), replace=False))
    vit = vitlib.make_vit(cfg.vit_family, cfg.vit_ckpt)
    recorder = vitlib.RecordedVisionTransformer(
        vit, store.metadata.n_patches_per_img, store.metadata.cls_token, store.layers
    ).eval()
    source = images.make_image_source(cfg.data, vitlib.make_img_transform(cfg.vit_family, cfg.vit_ckpt), store.n_imgs)
    pixels = torch.stack([source[int(i)][0] for i in picked])
    with torch.inference_mode():
        _, fresh = recorder(pixels)  # [n, n_layers, n_tokens, d]
    fresh = fresh.float().numpy()
    problems = []
    for j, layer in enumerate(store.layers):
        stored = np.stack([np.asarray(store.array(layer)[int(i)], dtype=np.float32) for i in picked])
        scale = float(np.abs(fresh[:, j]).max()) or 1.0
        worst = float(np.abs(stored - fresh[:, j]).max())
        if not worst <= TOLERANCE[store.metadata.dtype] * scale:
            problems.append(
                f"layer {layer}: stored rows of images {picked.tolist()} differ from a fresh forward "
                f"pass by up to {worst:.3g} (values up to {scale:.3g}); the store was not recorded from "
                "this checkpoint and these images"
            )
    return problems
