"""Shared fixtures. Checkpoints are random weights saved once per session to a temporary folder and loaded through
the libraries' own local-file routes (no downloads on our machines)."""

import os

import pytest


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
