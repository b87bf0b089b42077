"""Heatmap rendering throughput: overlay + atomic PNG save, one process (one core).

    .venv/bin/python benchmarks/bench_rendering.py [--n-imgs 500] [--width 400] [--height 300] [--size 224]

Makes ``--n-imgs`` random RGB images in memory (the originals; decoding them is the top-k module's cost, not this
one's), each with a random 7x7 activation row (49 patches, ViT-B/32, about half the patches zero), and times

  (a) ``overlay_heatmap`` alone (shrink to ``--size`` shortest side, colour, blend), and
  (b) ``overlay_heatmap`` + ``save_png`` into a temporary folder: the figure the goal (>= 100 img/s) is about.

Two kinds of pixels: ``noise`` (uniform random, the worst case for PNG compression) and ``photo-like`` (smooth
gradients with mild noise, closer to real pictures). The first image of each kind is rendered once before timing
(colormap table, imports).
"""

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from saev_core.visuals.heatmaps import ViewGeometry, overlay_heatmap, save_png  # noqa: E402

GRID = (7, 7)


def make_images(kind: str, n: int, width: int, height: int, rng: np.random.Generator) -> list[Image.Image]:
    imgs = []
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(n):
        if kind == "noise":
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        else:
            phase = rng.uniform(0, 2 * np.pi, 3)
            base = 127 + 100 * np.sin(xs[..., None] / 40 + ys[..., None] / 60 + phase)
            pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        imgs.append(Image.fromarray(pixels, mode="RGB"))
    return imgs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-imgs", type=int, default=500)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--size", type=int, default=224, help="shortest side of the rendered image")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    geometry = ViewGeometry(resize=224, crop=224)
    box = geometry.crop_box(args.width, args.height)
    values = rng.exponential(1.0, (args.n_imgs, GRID[0] * GRID[1])).astype(np.float32)
    values[rng.random(values.shape) < 0.5] = 0.0
    vmax = float(values.max())

    print(f"{args.n_imgs} images {args.width}x{args.height}, 49 patches, rendered at {args.size} px shortest side")
    for kind in ("noise", "photo-like"):
        imgs = make_images(kind, args.n_imgs, args.width, args.height, rng)
        overlay_heatmap(imgs[0], values[0], GRID, box, vmax, shortest_side=args.size)  # warm-up

        start = time.perf_counter()
        for img, row in zip(imgs, values):
            overlay_heatmap(img, row, GRID, box, vmax, shortest_side=args.size)
        render_s = time.perf_counter() - start

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            for i, (img, row) in enumerate(zip(imgs, values)):
                save_png(overlay_heatmap(img, row, GRID, box, vmax, shortest_side=args.size), f"{tmp}/{i}.png")
            total_s = time.perf_counter() - start
            size_kb = sum(p.stat().st_size for p in pathlib.Path(tmp).iterdir()) / args.n_imgs / 1024

        print(
            f"  {kind:10s}  overlay only: {args.n_imgs / render_s:7.0f} img/s   "
            f"overlay + save_png: {args.n_imgs / total_s:6.0f} img/s   ({size_kb:.0f} KB per PNG)"
        )


if __name__ == "__main__":
    main()
