"""CUDA path check (run on a GPU machine): record the same images on cuda and on cpu and compare the stores, then
train a small sweep on cuda through the CLI and load a checkpoint back.

    python benchmarks/gpu_smoke.py [--n-imgs 64]
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from saev_core.__main__ import main
from saev_core.record.vit import save_random_weights
from saev_core.store import ActivationStore


def last_line(fn) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert fn() == 0
    print(buf.getvalue())
    return buf.getvalue().strip().splitlines()[-1]


def run(args, tmp: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(args.n_imgs):
        os.makedirs(f"{tmp}/imgs/c{i % 4}", exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(f"{tmp}/imgs/c{i % 4}/{i}.png")
    weights = save_random_weights("clip", "ViT-B-32", f"{tmp}/vit.pt", seed=0)
    stores = {}
    for device in (args.device, "cpu"):
        t0 = time.perf_counter()
        stores[device] = last_line(
            lambda device=device: main(
                [
                    "activations",
                    "--vit-ckpt",
                    f"ViT-B-32/{weights}",
                    "--vit-layers",
                    "-2",
                    "-1",
                    "--device",
                    device,
                    "--dump-to",
                    f"{tmp}/acts-{device}-{len(stores)}",
                    "--n-patches-per-shard",
                    str(32 * 50 * 2),
                    "--vit-batch-size",
                    "32",
                    "data:image-folder-dataset",
                    "--data.root",
                    f"{tmp}/imgs",
                ]
            )
        )
        print(f"recorded on {device} in {time.perf_counter() - t0:.1f} s")
    gpu, cpu = (ActivationStore.open(stores[d]) for d in (args.device, "cpu"))
    for layer in (-2, -1):
        a, b = gpu.array(layer)[:], cpu.array(layer)[:]
        rel = np.abs(a - b).max() / np.abs(b).max()
        print(
            f"layer {layer}: {args.device} vs cpu max |diff| {np.abs(a - b).max():.2e}, relative to max |x| {rel:.2e}"
        )
    csv = last_line(
        lambda: main(
            [
                "train",
                "--data.shard-root",
                stores[args.device],
                "--data.layer",
                "-2",
                "--sae.d-vit",
                "768",
                "--sae.arch",
                "topk",
                "--sae.k",
                "16",
                "--sae.exp-factor",
                "8",
                "--n-patches",
                "20000",
                "--sae-batch-size",
                "256",
                "--lr",
                "1e-3",
                "--n-lr-warmup",
                "2",
                "--device",
                args.device,
                "--ckpt-path",
                f"{tmp}/ckpts",
            ]
        )
    )
    print(open(csv).read())
    import pandas as pd

    from saev_core import nn

    sae = nn.load(pd.read_csv(csv)["ckpt"][0], device=args.device)
    print("loaded", type(sae).__name__, "on", next(sae.parameters()).device)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-imgs", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(args, tmp)
