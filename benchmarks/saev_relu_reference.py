"""The saev 0.1.0 figures behind tests/train/test_training.py::SAEV_0_1_0_RELU_L0: saev's own training and evaluation
code (``saev.training.train``, ``saev.training.evaluate``) on the planted dictionary, relu at one coefficient.

saev 0.1.0 runs beside this project's torch, with nothing large downloaded:

    pip download --no-deps saev==0.1.0 einops==0.8.2 -d /tmp/saev01_train
    pip install --no-deps --target /tmp/saev01_train/site /tmp/saev01_train/*.whl
    PYTHONPATH=/tmp/saev01_train/site .venv/bin/python benchmarks/saev_relu_reference.py [--seeds 0,1,2]

``saev.training`` imports wandb, and with ``track=False`` calls only ``wandb.init(mode="disabled")``; this script puts
a no-op stand-in for that one call first on the path (in a temporary folder), so none of saev's arithmetic changes.
The vectors are written as saev shards (``metadata.json`` and ``acts000000.bin``: images x layers x (1 + patches) x
d_vit float32, the CLS slot zero) and read with --data.no-scale-mean --data.no-scale-norm. They are centred first
because saev 0.1.0 starts b_dec at 0 (its ``init_b_dec`` is defined but never called); we start it at the data mean.
About 3 minutes per seed on 2 CPU cores (saev reads one vector per ``__getitem__``).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_planted import plant_dictionary  # noqa: E402

WANDB_STAND_IN = """
class _Run:
    id = "local"
    def log(self, *args, **kwargs): pass
    def finish(self): pass
def init(*args, mode=None, **kwargs):
    assert mode == "disabled", "only track=False is supported"
    return _Run()
class Table:
    def __init__(self, *args, **kwargs): pass
"""


def planted_for_saev(n: int, d: int, seed: int) -> np.ndarray:
    """The test's vectors: the planted dictionary, centred, scaled to E||x||^2 = d."""
    x = plant_dictionary(n, d, 128, 4, 0.05, seed).x
    x -= x.mean(axis=0)
    x *= np.sqrt(d / (x**2).sum(axis=1).mean())
    return x.astype(np.float32)


def write_saev_shards(root: str, x: np.ndarray, n_tokens: int) -> None:
    n_imgs, d = len(x) // n_tokens, x.shape[1]
    os.makedirs(root, exist_ok=True)
    meta = dict(
        vit_family="clip",
        vit_ckpt="planted",
        layers=[-2],
        n_patches_per_img=n_tokens,
        cls_token=True,
        d_vit=d,
        seed=0,
        n_imgs=n_imgs,
        n_patches_per_shard=n_imgs * (n_tokens + 1),
        data="planted",
    )
    with open(os.path.join(root, "metadata.json"), "w") as f:
        json.dump(meta, f)
    acts = np.zeros((n_imgs, 1, n_tokens + 1, d), np.float32)
    acts[:, 0, 1:] = x.reshape(n_imgs, n_tokens, d)
    acts.tofile(os.path.join(root, "acts000000.bin"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="SAE seeds (one saev run each)")
    parser.add_argument("--coeff", type=float, default=0.04)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n-lr-warmup", type=int, default=20)
    parser.add_argument("--n-patches", type=int, default=256_000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="saev_reference-")
    os.makedirs(os.path.join(tmp, "wandb"))
    with open(os.path.join(tmp, "wandb", "__init__.py"), "w") as f:
        f.write(WANDB_STAND_IN)
    sys.path.insert(0, tmp)
    from saev import config, training  # saev 0.1.0, from PYTHONPATH

    d = 64
    x = planted_for_saev(102_400, d, seed=0)
    write_saev_shards(os.path.join(tmp, "shards"), x, n_tokens=64)
    data = config.DataLoad(
        shard_root=os.path.join(tmp, "shards"), layer=-2, patches="patches", scale_mean=False, scale_norm=False
    )
    for seed in [int(s) for s in args.seeds.split(",")]:
        sae = config.SparseAutoencoder(d_vit=d, exp_factor=4, sparsity_coeff=args.coeff, seed=seed)
        cfg = config.Train(
            data=data,
            n_workers=0,
            n_patches=args.n_patches,
            sae=sae,
            lr=args.lr,
            n_lr_warmup=args.n_lr_warmup,
            sae_batch_size=args.batch_size,
            track=False,
            log_every=10**9,
            device="cpu",
            seed=seed,
            ckpt_path=os.path.join(tmp, "ckpt"),
        )
        torch.manual_seed(seed)  # saev initialises from torch's global generator and seeds it nowhere
        t0 = time.perf_counter()
        saes, _, steps = training.train([cfg])
        [metrics] = training.evaluate([cfg], saes)
        print(
            f"seed {seed}: {steps} steps, L0 {metrics.l0:.3f}, MSE {metrics.mse:.4f}, "
            f"dead {metrics.n_dead}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
