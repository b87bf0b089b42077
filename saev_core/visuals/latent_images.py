"""The selected latents' pictures under ``dump_to``: each latent's best images with its heatmap drawn over them
(``neurons/<latent>/<rank>.png``) and each of those images once as it is (``originals/<image>.png``), rendered on a
thread pool; pictures of an earlier selection are removed. The explorer draws a heatmap the job did not render with
the same ``load_view`` and ``draw_top_image``."""

import concurrent.futures
import functools
import math
import os

import numpy as np
from jaxtyping import Int
from PIL import Image
from tqdm.auto import tqdm

from saev_core import threads
from saev_core.errors import UserError
from saev_core.files import inside
from saev_core.record import images
from saev_core.record import vit as vitlib
from saev_core.store import ActivationStore
from saev_core.visuals import heatmaps, patch_classes
from saev_core.visuals.gallery_layout import NEURONS_DIR, ORIGINALS_DIR, image_relpath, original_relpath
from saev_core.visuals.latent_rows import LatentRows, finite_or_none
from saev_core.visuals.topk_cache import TopKCache

RENDER_SIDE = 224
"""Rendered images have this shortest side (the ViT's own view size), never more than the original."""
HEATMAP_MAX_ALPHA, HEATMAP_ALPHA_GAMMA = 0.8, 0.5
"""A patch's opacity is 0.8 * (value / vmax) ** 0.5: weak patches still show (the colour says the value), and the
original beside the heatmap in the gallery shows what the overlay covers."""


def render_latents(
    cache: TopKCache,
    latents: Int[np.ndarray, " n"],
    store: ActivationStore,
    image_root: str,
    dump_to: str,
    n_per_latent: int,
    show_progress: bool = False,
    probe: patch_classes.ProbeView | None = None,
) -> list[dict]:
    """Heatmaps and metadata.json for each latent's best ``n_per_latent`` images, and each of those images once
    without a heatmap (``originals/``); the gallery rows, in order."""
    meta = store.metadata
    geometry = heatmaps.geometry_of_transform(vitlib.make_img_transform(meta.vit_family, meta.vit_ckpt))
    grid = patch_grid(meta.n_patches_per_img)
    paths = store.image_paths()
    load = functools.lru_cache(maxsize=256)(lambda i: load_view(os.path.join(image_root, paths[i]), geometry))
    counts = {int(j): int(min(n_per_latent, cache.n_images()[j])) for j in latents}
    jobs = [(latent, rank) for latent, n in counts.items() for rank in range(n)]
    originals = sorted({int(cache.top_images[latent, rank]) for latent, rank in jobs})
    views: dict[int, tuple[tuple[int, int], heatmaps.Box]] = {}

    def render(job: tuple[int, int]) -> None:
        latent, rank = job
        if latent < 0:  # an original: the picture the heatmaps are drawn on, as it is
            img, box = load(rank)
            views[rank] = (img.size, box)
            heatmaps.save_png(img, os.path.join(dump_to, original_relpath(rank)))
            return
        out = draw_top_image(cache, latent, rank, load(int(cache.top_images[latent, rank])), grid)
        heatmaps.save_png(out, os.path.join(dump_to, image_relpath(latent, rank)))

    _remove_stale(dump_to, counts, set(originals))
    with (
        concurrent.futures.ThreadPoolExecutor(threads.usable_cpus()) as pool,
        tqdm(total=len(jobs) + len(originals), unit="img", desc="heatmaps", disable=not show_progress) as bar,
    ):
        for _ in pool.map(render, [(-1, i) for i in originals] + jobs):
            bar.update()
    context = LatentRows(cache, store, dump_to, views, grid, probe)
    return [context.row(int(latent), counts[int(latent)]) for latent in latents]


def _remove_stale(dump_to: str, n_images: dict[int, int], originals: set[int] = frozenset()) -> None:
    """Make neurons/ and originals/ hold exactly this selection: folders of latents no longer selected, ranks
    beyond what is rendered now and originals no heatmap shows go (only the names this module writes: numeric
    folders, <rank>.png, metadata.json, <image>.png)."""
    root = os.path.join(dump_to, NEURONS_DIR)
    os.makedirs(root, exist_ok=True)
    for entry in os.listdir(root):
        folder = os.path.join(root, entry)
        if entry.isdigit() and int(entry) not in n_images and os.path.isdir(folder):
            for name in os.listdir(folder):
                if name == "metadata.json" or (name.endswith(".png") and name[:-4].isdigit()):
                    os.remove(os.path.join(folder, name))
            if not os.listdir(folder):
                os.rmdir(folder)
    for latent, n in n_images.items():
        folder = inside(root, str(latent), what="latent id")
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".png") and name[:-4].isdigit() and int(name[:-4]) >= n:
                os.remove(os.path.join(folder, name))
    plain = os.path.join(dump_to, ORIGINALS_DIR)
    os.makedirs(plain, exist_ok=True)
    for name in os.listdir(plain):
        if name.endswith(".png") and name[:-4].isdigit() and int(name[:-4]) not in originals:
            os.remove(os.path.join(plain, name))


def draw_top_image(
    cache: TopKCache, latent: int, rank: int, view: tuple[Image.Image, heatmaps.Box], grid: tuple[int, int]
) -> Image.Image:
    """The latent's rank-th top image (``load_view``) with its patch values drawn over it and its CLS value below.

    One colour scale per latent, so its ranks compare: its top patch value (in cls mode the CLS ranks the images,
    but the heatmap shows patches, which may go higher)."""
    img, box = view
    vmax = float(max(cache.top_values[latent, 0], cache.top_patches[latent].max(initial=0.0)))
    return heatmaps.overlay_heatmap(
        img,
        cache.top_patches[latent, rank],
        grid,
        box,
        vmax,
        max_alpha=HEATMAP_MAX_ALPHA,
        alpha_gamma=HEATMAP_ALPHA_GAMMA,
        shortest_side=None,
        cls_value=finite_or_none(cache.top_cls[latent, rank]),
    )


def load_view(
    path: str,
    geometry: heatmaps.ViewGeometry,
    fix: str = "Pass images:image-folder-dataset --images.root DIR if the images moved.",
) -> tuple[Image.Image, heatmaps.Box]:
    """The image shrunk to the rendering size, and the ViT's crop box in its pixels."""
    try:
        original = images.load_rgb(path)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read the image {path} for a heatmap ({err}). {fix}") from None
    box = geometry.crop_box(*original.size)
    img = heatmaps.fit_shortest_side(original, RENDER_SIDE)
    sx, sy = img.width / original.width, img.height / original.height
    return img, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def patch_grid(n_patches: int) -> tuple[int, int]:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise UserError(f"{n_patches} patches per image do not make a square grid; heatmaps need a square one.")
    return side, side
