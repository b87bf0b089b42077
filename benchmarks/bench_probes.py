"""The probe job against one plain SAE forward pass over the same store, and its peak memory at two store sizes.

    .venv/bin/python benchmarks/bench_probes.py [--n-imgs 500,2000] [--d-vit 768] [--n-tokens 50] [--exp-factor 8]
        [--k 32] [--n-classes 8] [--repeats 1] [--variants plain,probe,probe+controls]

For each ``--n-imgs`` a store is planted in a temporary folder (ViT-B/32 shapes by default: CLS + 49 patches,
d_vit 768, float32 standard normal values) with per-patch labels (``--n-classes`` classes, one patch in ten
unlabelled), and a topk SAE with random weights (d_sae = d_vit x 8, k 32) is saved with that store in its
provenance. Each variant runs in a fresh child process (so its peak resident memory, ``ru_maxrss``, is its own):

- ``plain``: ``sae.encode`` on every patch vector of the store, read through ``shards.stream_chunks`` in store
  order in batches of ``top_images.batch_images`` images (what the top-k pass does; the result is thrown away);
- ``probe``: ``probe_run.run_probes`` with no controls: the calibration sample, the one pass (``probes.probe_pass``:
  the SAE's forward, binning, the held-out extremes), the probe fits and probe.json;
- ``probe+controls``: the same with the PCA, random-decoder and k-means controls (each an encoder of its own in the
  same pass).

Printed: wall-clock and CPU seconds of each, the ratio probe / plain (goal <= 3) and the peak RSS of each at each
size (the probe's should not grow with the number of patches; the labels array, 2 bytes per patch, is the only
per-patch state). The machine is shared: the load average is printed before and after.
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from saev_core import config, nn  # noqa: E402
from saev_core.store import ActivationStore, write_store  # noqa: E402
from saev_core.store.shards import ChunkReader, stream_chunks  # noqa: E402
from saev_core.visuals import top_images  # noqa: E402


def plant(root: str, n_imgs: int, args) -> str:
    rng = np.random.default_rng(0)
    n_patches = args.n_tokens - 1
    labels = rng.integers(1, args.n_classes + 1, size=(n_imgs, n_patches))
    labels[rng.random(labels.shape) < 0.1] = 0
    store = write_store(
        root,
        lambda start, end: rng.standard_normal((1, end - start, args.n_tokens, args.d_vit), dtype=np.float32),
        shape=(n_imgs, args.n_tokens, args.d_vit),
        imgs_per_shard=2_400_000 // args.n_tokens,
        fingerprint=f"bench-probes-{n_imgs}",
        patch_labels=labels,
        patch_class_names=["unlabelled", *(f"class{c}" for c in range(args.n_classes))],
    )
    sae = nn.make_sae(
        config.SparseAutoencoderConfig(d_vit=args.d_vit, exp_factor=args.exp_factor, arch="topk", k=args.k)
    )
    nn.dump(os.path.join(root, "sae"), sae, {"store": store.path, "layer": -2, "token_mode": "patches", "data_seed": 0})
    return store.path


@torch.inference_mode()
def plain_pass(store_path: str, ckpt: str) -> int:
    store, sae = ActivationStore.open(store_path), nn.load(ckpt)
    per_batch = top_images.batch_images(store.n_tokens, sae.cfg.d_sae, store.d_vit, "cpu")
    images = np.flatnonzero(store.usable_images())
    ipc = store.layout.imgs_per_chunk
    chunks, starts = np.unique(images // ipc, return_index=True)
    xs, n_done = [], 0
    for c, imgs, x in stream_chunks(
        ChunkReader(store.array(-2)), chunks, np.split(images, starts[1:]), ipc, store.n_imgs
    ):
        xs.append(x[imgs - c * ipc, 1:])
        if sum(map(len, xs)) >= per_batch or imgs[-1] == images[-1]:
            batch = np.concatenate(xs)
            for lo in range(0, len(batch), per_batch):
                sae.encode(torch.from_numpy(batch[lo : lo + per_batch]).reshape(-1, store.d_vit))
            n_done += len(batch)
            xs = []
    return n_done


def child(variant: str, store_path: str, out: str) -> None:
    from saev_core.analysis import probe_run

    ckpt = os.path.join(os.path.dirname(store_path), "sae")
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "plain":
        plain_pass(store_path, ckpt)
        extra = {}
    else:
        controls = config.PROBE_CONTROLS if variant == "probe+controls" else ()
        cfg = config.ProbeConfig(ckpt=ckpt, dump_to=out, controls=controls, device="cpu")
        result = probe_run.run_probes(cfg, show_progress=False)
        extra = {"map": result.sae.map}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "rss_mb": rss_mb, **extra}))


def run_child(variant: str, store_path: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--store", store_path, "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-imgs", default="500,2000")
    parser.add_argument("--d-vit", type=int, default=768)
    parser.add_argument("--n-tokens", type=int, default=50)
    parser.add_argument("--exp-factor", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--n-classes", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default="plain,probe,probe+controls")
    parser.add_argument("--child", default=None)
    parser.add_argument("--store", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.store, args.out)
        return
    print(f"load average at the start: {os.getloadavg()} (the machine is shared: other work inflates every variant)")
    print(
        f"torch threads {torch.get_num_threads()}, d_vit {args.d_vit}, d_sae {args.d_vit * args.exp_factor}, k {args.k}"
    )
    tmp = tempfile.mkdtemp(prefix="bench-probes-")
    try:
        rows = []
        for n_imgs in map(int, args.n_imgs.split(",")):
            store_path = plant(os.path.join(tmp, f"store-{n_imgs}"), n_imgs, args)
            best = {}
            for _ in range(args.repeats):
                for variant in args.variants.split(","):
                    r = run_child(variant, store_path, os.path.join(tmp, f"out-{n_imgs}-{variant}"))
                    if variant not in best or r["wall"] < best[variant]["wall"]:
                        best[variant] = r
            rows.append((n_imgs, n_imgs * (args.n_tokens - 1), best))
            shutil.rmtree(os.path.dirname(store_path), ignore_errors=True)
        print(
            f"\n{'images':>7} {'patches':>9} {'variant':>15} {'wall s':>8} {'cpu s':>8} {'/ plain':>8} "
            f"{'peak RSS MB':>12}"
        )
        for n_imgs, n_patches, best in rows:
            for variant, r in best.items():
                ratio = r["wall"] / best["plain"]["wall"] if "plain" in best else float("nan")
                print(
                    f"{n_imgs:>7} {n_patches:>9} {variant:>15} {r['wall']:>8.1f} {r['cpu']:>8.1f} {ratio:>8.2f} "
                    f"{r['rss_mb']:>12.0f}"
                )
        print(f"\nload average at the end: {os.getloadavg()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
