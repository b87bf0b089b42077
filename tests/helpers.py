"""Helpers the tests share: small images, the `activations` command line, a tiny pipeline file, exact SAEs, a tiny
recorded-and-trained run, folder comparison, the `dagster dev` command line.
Imported by name (``from tests.helpers import write_images``), never through conftest.py, so a reader sees where a
helper comes from."""

import os
import pathlib
import sys

import numpy as np
from PIL import Image


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


def activations_argv(
    vit_ckpt: str,
    data_root,
    dump_to,
    *extra: str,
    family: str | None = "clip",
    data_kind: str = "image-folder-dataset",
    data_flags=(),
) -> list[str]:
    """The `activations` command line for a folder of images, recorded in this process (no worker processes):
    ``extra`` flags go before the data subcommand, ``data_flags`` after it; ``family=None`` leaves --vit-family
    to its default."""
    return [
        "activations",
        *(["--vit-family", family] if family else []),
        "--vit-ckpt",
        vit_ckpt,
        "--dump-to",
        str(dump_to),
        "--n-workers",
        "0",
        *extra,
        f"data:{data_kind}",
        "--data.root",
        str(data_root),
        *data_flags,
    ]


TINY_SAE_FLAGS = ["--sae.d-vit", "64", "--sae.exp-factor", "2", "--sae.arch", "topk", "--sae.k", "4"]
"""`train` flags for the SAE the tiny pipeline trains on the tiny CLIP's 64-wide activations: topk, 128 latents."""


def tiny_pipeline_text(root, vit_ckpt: str, layers, max_frac_dead: float = 1.0) -> str:
    """A pipeline file for the tiny ViT, small enough for a test: the images in ``root/imgs`` (write them with
    ``write_images``), every output under ``root``, a sweep of two learning rates, visuals of every member."""
    root = pathlib.Path(root)
    return f"""
[activations]
vit_family = "clip"
vit_ckpt = "{vit_ckpt}"
vit_layers = {list(layers)}
dump_to = "{root / "acts"}"
n_patches_per_shard = {4 * 50 * 2}
n_workers = 0

[activations.data]
kind = "image-folder-dataset"
root = "{root / "imgs"}"

[train]
n_patches = 2048
sae_batch_size = 64
lr = 1e-3
n_lr_warmup = 2
ckpt_path = "{root / "ckpts"}"

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
dump_to = "{root / "visuals"}"
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


def identity_sae(path, store_path: str, d_vit: int) -> str:
    """A relu SAE with W_enc = W_dec = I (exp_factor 1, no bias): latent j is relu(x_j), so a planted dimension is a
    planted latent. Saved with provenance (store, layer -1, patches): a file without any is taken for saev 0.1.0's
    and given the store's normalisation. Returns the saved path."""
    import torch

    from saev_core import config, nn

    sae = nn.make_sae(config.SparseAutoencoderConfig(d_vit=d_vit, exp_factor=1, arch="relu"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d_vit))
        sae.W_dec.copy_(torch.eye(d_vit))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return nn.dump(path, sae, {"store": store_path, "layer": -1, "token_mode": "patches"})


def store_with_class_images(root, acts: np.ndarray, labels: np.ndarray, names: list[str], rng, side: int, **store_kw):
    """A planted store at ``root/store`` holding ``acts`` [1, n_imgs, n_tokens, d] as layer -1, whose images exist:
    random side x side pictures drawn from ``rng``, at ``root/imgs/<class name>/<i>.png`` for labels [n_imgs]
    (indices into ``names``); ``store_kw`` go to write_store (patch labels, for example)."""
    from saev_core.store import write_store

    root = pathlib.Path(root)
    paths = [f"{names[label]}/{i}.png" for i, label in enumerate(labels)]
    for rel in paths:
        os.makedirs(root / "imgs" / os.path.dirname(rel), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / "imgs" / rel)
    return write_store(
        str(root / "store"),
        acts,
        layers=(-1,),
        image_paths=paths,
        labels=labels.tolist(),
        class_names=names,
        image_root=str(root / "imgs"),
        vit_ckpt="saev-tiny-clip/none",
        **store_kw,
    )


def tiny_run(
    root,
    tiny_clip_ckpt: str,
    n_imgs: int = 16,
    layer: int = -1,
    exp_factor: int = 2,
    vit_ckpt: str | None = None,
    val_frac: float = 0.25,
) -> tuple[str, str, str]:
    """(image folder, store path, sae.pt) under ``root``: n_imgs random images in two classes (cat, dog), recorded
    with the tiny CLIP (``vit_ckpt`` overrides the checkpoint string, e.g. a relative path), one topk SAE trained
    with ``val_frac`` of the images held out."""
    from saev_core import config
    from saev_core.__main__ import main
    from saev_core.train import trainer

    root = str(root)
    write_images(os.path.join(root, "imgs"), n_imgs, size=(64, 48))
    argv = activations_argv(
        vit_ckpt or tiny_clip_ckpt, os.path.join(root, "imgs"), os.path.join(root, "acts"), "--vit-layers", str(layer)
    )
    assert main(argv) == 0
    store = next(
        os.path.join(root, "acts", p)
        for p in os.listdir(os.path.join(root, "acts"))
        if os.path.isdir(os.path.join(root, "acts", p))
    )
    cfg = config.TrainConfig(
        data=config.DataLoadConfig(shard_root=store, layer=layer, val_frac=val_frac),
        sae=config.SparseAutoencoderConfig(d_vit=64, exp_factor=exp_factor, arch="topk", k=8),
        n_patches=40 * 64,
        sae_batch_size=64,
        n_lr_warmup=5,
        ckpt_path=os.path.join(root, "ckpt"),
        device="cpu",
        log_every=1000,
    )
    [result] = trainer.train_sweep([cfg], show_progress=False)
    return os.path.join(root, "imgs"), store, result.ckpt_path


def same_files(left, right) -> bool:
    """Whether two folders hold the same files with the same bytes, in every subfolder (none only on one side)."""
    import filecmp

    def same(c: filecmp.dircmp) -> bool:
        _, diff, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not (diff or errors or c.left_only or c.right_only) and all(same(sub) for sub in c.subdirs.values())

    return same(filecmp.dircmp(left, right))


def dagster_dev_argv(port: int) -> list[str]:
    """`dagster dev` on 127.0.0.1:``port`` with the repository's workspace.yaml (run it from the repository root)."""
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    return [dagster, "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
