"""A tiny recorded store and a trained SAE on it, shared by the inference, splice, association and explorer tests."""

import os

from saev_core import config
from saev_core.train import trainer
from saev_core.__main__ import main
from tests.conftest import write_images


def tiny_run(root, tiny_clip_ckpt: str, n_imgs: int = 16, layer: int = -1, exp_factor: int = 2,
             vit_ckpt: str | None = None) -> tuple[str, str, str]:
    """(image folder, store path, sae.pt) under ``root``: n_imgs random images in two classes (cat, dog), recorded
    with the tiny CLIP (``vit_ckpt`` overrides the checkpoint string, e.g. a relative path), one topk SAE trained."""
    root = str(root)
    write_images(os.path.join(root, "imgs"), n_imgs, size=(64, 48))
    argv = ["activations", "--vit-family", "clip", "--vit-ckpt", vit_ckpt or tiny_clip_ckpt, "--vit-layers",
            str(layer), "--dump-to", os.path.join(root, "acts"), "--n-workers", "0", "data:image-folder-dataset",
            "--data.root", os.path.join(root, "imgs")]
    assert main(argv) == 0
    store = next(os.path.join(root, "acts", p) for p in os.listdir(os.path.join(root, "acts"))
                 if os.path.isdir(os.path.join(root, "acts", p)))
    cfg = config.TrainConfig(
        data=config.DataLoadConfig(shard_root=store, layer=layer, val_frac=0.25),
        sae=config.SparseAutoencoderConfig(d_vit=64, exp_factor=exp_factor, arch="topk", k=8), n_patches=40 * 64,
        sae_batch_size=64, n_lr_warmup=5, ckpt_path=os.path.join(root, "ckpt"), device="cpu", log_every=1000,
    )
    [result] = trainer.train_sweep([cfg], show_progress=False)
    return os.path.join(root, "imgs"), store, result.ckpt_path
