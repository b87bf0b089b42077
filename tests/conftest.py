"""Shared fixtures. Checkpoints are random weights saved once per session to a temporary folder and loaded through
the libraries' own local-file routes (no downloads on our machines)."""

import os
import pathlib

import numpy as np
import pytest
from PIL import Image


def _random_ckpt(tmp_path_factory, family: str, arch: str, filename: str):
    """Save random weights for ``arch`` and yield its ``--vit-ckpt`` string; the file is deleted at session end
    (ViT-B-32 and SigLIP files are 0.6-0.8 GB, and pytest keeps the last three temporary folders)."""
    from saev_core.record.vit import save_random_weights

    path = save_random_weights(family, arch, tmp_path_factory.mktemp("vit_ckpts") / filename, seed=0)
    yield f"{arch}/{path}"
    if os.path.exists(path):
        os.remove(path)


@pytest.fixture(scope="session")
def tiny_clip_ckpt(tmp_path_factory):
    """``"saev-tiny-clip/<path>"``: the shipped tiny open_clip config (width 64, 2 blocks, 49 patches), random."""
    yield from _random_ckpt(tmp_path_factory, "clip", "saev-tiny-clip", "tiny_clip.pt")


@pytest.fixture(scope="session")
def vit_b32_ckpt(tmp_path_factory):
    """``"ViT-B-32/<path>"``: open_clip ViT-B-32 (768 wide, 12 blocks, 49 patches), random."""
    yield from _random_ckpt(tmp_path_factory, "clip", "ViT-B-32", "vit_b32.pt")


@pytest.fixture(scope="session")
def siglip_ckpt(tmp_path_factory):
    """``"ViT-B-16-SigLIP/<path>"``: open_clip's timm-based SigLIP (768 wide, 12 blocks, 196 patches, no CLS)."""
    yield from _random_ckpt(tmp_path_factory, "siglip", "ViT-B-16-SigLIP", "siglip.pt")


@pytest.fixture(scope="session")
def dinov2_reg_ckpt(tmp_path_factory):
    """``"vit_small_patch14_reg4_dinov2/<path>"``: timm DINOv2-S with 4 registers, saved at its 518 px default
    (loading at 224 px resamples the position embedding: 256 patches)."""
    yield from _random_ckpt(tmp_path_factory, "dinov2", "vit_small_patch14_reg4_dinov2", "dinov2_reg4.pt")


@pytest.fixture(autouse=True)
def _seed_global_rngs():
    """Tests that draw from torch's global generator get the same numbers on every run (no flaky tolerances)."""
    import torch

    torch.manual_seed(0)
    yield


def write_images(root, n: int, size=(64, 48)) -> list[str]:
    """n small random images spread over two classes; returns their relative paths."""
    rng = np.random.default_rng(n)
    rels = []
    for i in range(n):
        rel = f"{'cat' if i % 2 else 'dog'}/img{i:03d}.png"
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
        rels.append(rel)
    return rels


def tiny_pipeline_text(root, vit_ckpt: str, layers, max_frac_dead: float = 1.0) -> str:
    """A pipeline file for the tiny ViT, small enough for a test: the images in ``root/imgs`` (write them with
    ``write_images``), every output under ``root``, a sweep of two learning rates, visuals of every member."""
    root = pathlib.Path(root)
    return f"""
[activations]
vit_family = "clip"
vit_ckpt = "{vit_ckpt}"
vit_layers = {list(layers)}
dump_to = "{root / 'acts'}"
n_patches_per_shard = {4 * 50 * 2}
n_workers = 0

[activations.data]
kind = "image-folder-dataset"
root = "{root / 'imgs'}"

[train]
n_patches = 2048
sae_batch_size = 64
lr = 1e-3
n_lr_warmup = 2
ckpt_path = "{root / 'ckpts'}"

[train.data]
val_frac = 0.2

[train.sae]
d_vit = 64
exp_factor = 2
arch = "topk"
k = 4

[sweep]
lr = [1e-3, 3e-3]

[visuals]
members = "all"
dump_to = "{root / 'visuals'}"
top_k = 4
n_imgs_per_latent = 3
log_freq_range = [-10.0, 0.0]
log_value_range = [-10.0, 10.0]
device = "cpu"

[checks]
max_frac_dead = {max_frac_dead}
"""


def exact_relu_sae(d_vit: int):
    """relu(x) - relu(-x) = x: a relu SAE (exp_factor 2, no bias, weights 0 and +-1) whose reconstruction of its
    normalised input is exact, and whose latents j and d_vit + j are the positive and negative parts of x_j."""
    import torch

    from saev_core import config, nn

    sae = nn.make_sae(config.SparseAutoencoderConfig(d_vit=d_vit, exp_factor=2, arch="relu"))
    eye = torch.eye(d_vit)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae
