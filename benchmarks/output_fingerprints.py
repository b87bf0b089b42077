"""sha256 of every file a small seeded record -> train -> visuals run writes, through the CLI only.

Why: a refactor that moves code must leave every on-disk output byte-identical. Run this on two trees (for example
the commit before a refactor, checked out with `git worktree add`, and the current one) with the same `--out` and
compare the manifests:

    python benchmarks/output_fingerprints.py --tree /tmp/before --out /tmp/fp > before.txt
    python benchmarks/output_fingerprints.py --tree .           --out /tmp/fp > after.txt
    diff before.txt after.txt && echo identical

The same `--out` matters: stores and checkpoints record absolute paths. Timing files (`metrics.jsonl`'s wall-clock
fields, logs) are listed by name but not hashed, and neither are the cache folder's lock files.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

# Files whose content records wall-clock time or throughput, so two runs of the same code differ.
TIMED = ("metrics.jsonl", "train.log", "recording.json")


def write_images(root: str, n: int) -> None:
    rng = np.random.default_rng(n)
    for i in range(n):
        path = os.path.join(root, "cat" if i % 2 else "dog", f"img{i:03d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(path)
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))  # the image fingerprint reads mtimes


def cli(tree: str, *argv: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONHASHSEED="0")
    out = subprocess.run(
        [sys.executable, "-m", "saev_core", *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=os.path.abspath(tree),
    )
    return out.stdout.strip().splitlines()[-1]


def save_random_vit(tree: str, path: str) -> None:
    code = (
        "import sys\n"
        "try:\n    from saev_core.record.vit import save_random_weights\n"
        "except ImportError:\n    from saev_core.vit import save_random_weights\n"
        "save_random_weights('clip', 'saev-tiny-clip', sys.argv[1], seed=0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    subprocess.run([sys.executable, "-c", code, path], env=env, check=True, cwd=os.path.abspath(tree))


def manifest(out: str) -> list[str]:
    rows = []
    for folder, _, files in os.walk(out):
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out)
            if name in TIMED:
                rows.append(f"{'(timed, not hashed)':64s}  {rel}")
                continue
            with open(path, "rb") as f:
                rows.append(f"{hashlib.sha256(f.read()).hexdigest()}  {rel}")
    return sorted(rows, key=lambda r: r[66:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=".", help="the source tree to run (put first on PYTHONPATH)")
    parser.add_argument("--out", default="/tmp/saev-output-fingerprints", help="scratch folder, emptied first")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    shutil.rmtree(out, ignore_errors=True)
    write_images(os.path.join(out, "imgs"), 24)
    vit = os.path.join(out, "tiny_clip.pt")
    save_random_vit(args.tree, vit)
    store = cli(
        args.tree,
        "activations",
        "--vit-family",
        "clip",
        "--vit-ckpt",
        f"saev-tiny-clip/{vit}",
        "--vit-layers",
        "-2",
        "-1",
        "--n-patches-per-shard",
        "400",
        "--n-workers",
        "0",
        "--device",
        "cpu",
        "--dump-to",
        os.path.join(out, "acts"),
        "data:image-folder-dataset",
        "--data.root",
        os.path.join(out, "imgs"),
    )
    cli(
        args.tree,
        "train",
        "--data.shard-root",
        store,
        "--data.layer",
        "-1",
        "--sae.d-vit",
        "64",
        "--sae.exp-factor",
        "2",
        "--sae.arch",
        "topk",
        "--sae.k",
        "4",
        "--n-patches",
        "2048",
        "--sae-batch-size",
        "64",
        "--lr",
        "1e-3",
        "--n-lr-warmup",
        "2",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--n-threads",
        "1",
        "--ckpt-path",
        os.path.join(out, "ckpts"),
    )
    ckpts = sorted(os.path.join(d, "sae.pt") for d, _, f in os.walk(os.path.join(out, "ckpts")) if "sae.pt" in f)
    cli(
        args.tree,
        "visuals",
        "--ckpt",
        ckpts[0],
        "--dump-to",
        os.path.join(out, "visuals"),
        "--top-k",
        "4",
        "--n-imgs-per-latent",
        "3",
        "--log-freq-range",
        "-9",
        "0",
        "--log-value-range",
        "-9",
        "9",
        "--device",
        "cpu",
    )
    print("\n".join(manifest(out)))


if __name__ == "__main__":
    main()
