"""The visuals job: SAE checkpoint + store layer -> top-k cache -> latent selection -> heatmaps -> gallery page.

``python -m saev_core visuals`` and the ``topk_visuals`` Dagster asset both call ``make_visuals``. The pass and its
cache live in ``topk``, the overlays in ``imaging``, the page in ``gallery``; this module decides which latents and
images, and where files go (docs/visuals-format.md):

    <dump_to>/cache/topk.npz            the top-k arrays and statistics (reused when the inputs are the same)
    <dump_to>/cache/selection.json      the selected latents and the filters that chose them
    <dump_to>/neurons/<latent>/<rank>.png, metadata.json
    <dump_to>/originals/<image>.png     the pictures under the heatmaps, without them (one per store image)
    <dump_to>/index.html                the gallery
"""

import concurrent.futures
import dataclasses
import functools
import logging
import math
import os

import numpy as np
from jaxtyping import Float, Int
from PIL import Image
from tqdm.auto import tqdm

from saev_core import config, nn, threads
from saev_core.errors import UserError
from saev_core.files import atomic_write_json, check_output_folder, inside, read_json
from saev_core.nn import trained_on
from saev_core.record import images
from saev_core.record import vit as vitlib
from saev_core.store import ActivationStore
from saev_core.visuals import association, gallery, heatmaps, patch_classes, top_images

logger = logging.getLogger("saev_core.visuals.render")
RENDER_SIDE = 224
"""Rendered images have this shortest side (the ViT's own view size), never more than the original."""
HEATMAP_MAX_ALPHA, HEATMAP_ALPHA_GAMMA = 0.8, 0.5
"""A patch's opacity is 0.8 * (value / vmax) ** 0.5: weak patches still show (the colour says the value), and the
original beside the heatmap in the gallery shows what the overlay covers."""
CLASS_TABLE_LATENTS = 5
"""Latents per class in the gallery's class table; all of them are rendered."""
RANKING_MODES = trained_on.TokenModeRule(
    top_images.RANK_MODES, ", which rank no images; pass --data.patches patches or --data.patches cls."
)
"""The SAEs whose latents rank images: trained on patches or on the CLS token."""


@dataclasses.dataclass(frozen=True)
class VisualsResult:
    """What a visuals run made; the CLI prints ``index_html`` last and the Dagster asset reports the rest."""

    index_html: str
    dump_to: str
    latents: list[int]
    """The selected latents, as rendered."""
    n_heatmaps: int
    """Heatmaps written (latents x rendered ranks), not distinct images."""
    cache_reused: bool
    n_alive: int
    d_sae: int
    probe_json: str | None = None
    """The probe.json shown in the gallery's "patch probes" section, if any."""

    @property
    def n_images(self) -> int:
        """Old name of ``n_heatmaps`` (it counted heatmaps, not images)."""
        return self.n_heatmaps


@dataclasses.dataclass(frozen=True)
class VisualsInputs:
    """The resolved inputs: the SAE, its store and layer, and the token mode that ranks images."""

    sae: nn.SparseAutoencoder
    ckpt_path: str
    store: ActivationStore
    layer: int
    patches: str


def resolve_inputs(cfg: config.VisualsConfig, device: str) -> VisualsInputs:
    """Load the SAE and find its store, layer and token mode (flags first, then the checkpoint's provenance)."""
    found = trained_on.resolve(
        cfg.ckpt,
        device,
        cfg.data.shard_root,
        cfg.data.layer,
        cfg.data.patches,
        RANKING_MODES,
        missing_hint=" (the store path, the layer and patches or cls)",
        check_layer_flag=not cfg.allow_layer_mismatch,
    )
    return VisualsInputs(found.sae, found.ckpt_path, found.store, found.layer, found.token_mode)


def make_visuals(cfg: config.VisualsConfig, show_progress: bool = True) -> VisualsResult:
    """Run the whole job; the top-k pass only when ``<dump_to>/cache`` does not already hold it."""
    check_config(cfg)
    check_output_folder(cfg.dump_to, "--dump-to")
    device = config.resolve_device(cfg.device)
    inputs = resolve_inputs(cfg, device)
    image_root = _image_root(cfg, inputs.store)  # checked before the long pass
    identity = top_images.CacheIdentity(
        top_images.file_sha256(inputs.ckpt_path), inputs.store.metadata.key, inputs.layer, inputs.patches, cfg.top_k
    )
    cache = top_images.load_cache(cfg.dump_to, identity)
    reused = cache is not None
    with_classes = association.has_classes(inputs.store)
    assoc = association.load(cfg.dump_to, identity) if with_classes else None
    values = association.ImageValues(inputs.store, inputs.sae.cfg.d_sae) if with_classes and assoc is None else None
    if cache is None:
        cache = top_images.topk_pass(
            inputs.store,
            inputs.layer,
            inputs.patches,
            inputs.sae,
            cfg.top_k,
            identity,
            device=device,
            show_progress=show_progress,
            on_batch=values,
        )
        top_images.save_cache(cache, cfg.dump_to)
    elif values is not None:  # a cache from before the association, or its file deleted: one pass for the values
        top_images.topk_pass(
            inputs.store,
            inputs.layer,
            inputs.patches,
            inputs.sae,
            1,
            identity,
            device=device,
            show_progress=show_progress,
            on_batch=values,
        )
    if values is not None:
        assoc = association.compute(cache, values, inputs.store)
        association.save(assoc, identity, cfg.dump_to, cache.freq > 0)
    logger.info("top-k cache %s (%s)", top_images.cache_path(cfg.dump_to), "reused" if reused else "computed")
    probe = patch_classes.load_probe(cfg.probe, inputs.ckpt_path, inputs.store.metadata.key, inputs.layer, cache.d_sae)
    class_latents = (
        None
        if assoc is None
        else {
            name: assoc.top_latents(c, CLASS_TABLE_LATENTS)
            for c, name in enumerate(assoc.class_names)
            if assoc.n_images[c] > 0
        }
    )
    linked = linked_latents(cache, class_latents, probe)
    latents = select_latents(
        cache, cfg.log_freq_range, cfg.log_value_range, cfg.include_latents, cfg.n_latents, cfg.seed, linked
    )
    rows = render_latents(
        cache, latents, inputs.store, image_root, cfg.dump_to, cfg.n_imgs_per_latent, show_progress, probe
    )
    if assoc is not None:
        add_classes(rows, assoc)
    n_heatmaps = [row["n_heatmaps"] for row in rows]
    atomic_write_json(
        selection_path(cfg.dump_to),
        {
            "latents": latents.tolist(),
            "n_heatmaps": n_heatmaps,
            "n_images": n_heatmaps,
            "linked_latents": linked,
            "probe": None if probe is None else probe.path,
            "log_freq_range": cfg.log_freq_range,
            "log_value_range": cfg.log_value_range,
            "include_latents": list(cfg.include_latents),
            "n_latents": cfg.n_latents,
            "seed": cfg.seed,
            "n_imgs_per_latent": cfg.n_imgs_per_latent,
            "ckpt": os.path.abspath(inputs.ckpt_path),
            "store": inputs.store.path,
            "image_root": image_root,
        },
    )
    alive = cache.freq > 0
    with np.errstate(divide="ignore"):
        index = gallery.write_gallery(
            cfg.dump_to,
            rows,
            np.log10(cache.freq[alive]),
            np.log10(cache.mean_value[alive]),
            cfg.log_freq_range,
            cfg.log_value_range,
            title=f"SAE latents: {os.path.basename(os.path.dirname(inputs.ckpt_path))}, layer {inputs.layer}",
            class_latents=class_latents,
            probe=None if probe is None else probe.doc,
            top_k=cfg.top_k,
            n_per_latent=cfg.n_imgs_per_latent,
        )
    return VisualsResult(
        index,
        cfg.dump_to,
        latents.tolist(),
        sum(n_heatmaps),
        reused,
        int(alive.sum()),
        cache.d_sae,
        None if probe is None else probe.path,
    )


def linked_latents(
    cache: top_images.TopKCache, class_latents: dict | None, probe: patch_classes.ProbeView | None
) -> list[int]:
    """The latents that the class table and the probe section name and that fire (so they have heatmaps), in
    increasing id order: the page renders all of them, whatever the selection ranges."""
    named = {j for best in (class_latents or {}).values() for j, _ in best}
    named |= set(probe.best_latents() if probe else [])
    return sorted(j for j in named if cache.freq[j] > 0)


def add_classes(rows: list[dict], assoc) -> None:
    """Each gallery row gets its latent's best classes by AUROC, its selectivity and its top-k label shares."""
    selectivity = assoc.selectivity()
    for row in rows:
        latent = row["latent"]
        counts = assoc.top_label_counts[latent]
        shares = [(assoc.class_names[c], int(counts[c])) for c in np.argsort(-counts, kind="stable")[:3] if counts[c]]
        row["classes"] = assoc.top_classes(latent)
        row["top_labels"] = shares
        row["selectivity"] = float(selectivity[latent])


def selection_path(dump_to: str) -> str:
    return os.path.join(dump_to, "cache", "selection.json")


def missing_images(dump_to: str) -> list[str]:
    """What is missing for the selection in dump_to to be complete: every selected latent's heatmaps (as many as
    selection.json says) and its metadata.json. Empty when complete."""
    selection = read_json(selection_path(dump_to))
    if selection is None:
        return [f"no {selection_path(dump_to)}: the visuals never finished"]
    missing, originals = [], {}
    for latent, n in zip(selection["latents"], selection.get("n_heatmaps", selection.get("n_images"))):
        folder = os.path.join(dump_to, gallery.NEURONS_DIR, str(latent))
        names = [f"{rank}.png" for rank in range(n)] + ["metadata.json"]
        missing += [os.path.join(folder, name) for name in names if not os.path.isfile(os.path.join(folder, name))]
        try:
            shown = (read_json(os.path.join(folder, "metadata.json")) or {}).get("image_indices", [])[:n]
        except ValueError:
            missing.append(f"{os.path.join(folder, 'metadata.json')} (damaged)")
            shown = []
        originals.update(dict.fromkeys(os.path.join(dump_to, gallery.original_relpath(i)) for i in shown))
    missing += [path for path in originals if not os.path.isfile(path)]
    if not os.path.isfile(os.path.join(dump_to, "index.html")):
        missing.append(os.path.join(dump_to, "index.html"))
    return [f"missing {path}" for path in missing]


def check_config(cfg: config.VisualsConfig) -> None:
    problems = [
        *([f"--top-k {cfg.top_k} must be at least 1"] if cfg.top_k < 1 else []),
        *([f"--n-imgs-per-latent {cfg.n_imgs_per_latent} must be at least 1"] if cfg.n_imgs_per_latent < 1 else []),
        *([f"--n-latents {cfg.n_latents} must be at least 0"] if cfg.n_latents < 0 else []),
        *(
            [f"--log-freq-range {cfg.log_freq_range} has LOW > HIGH"]
            if cfg.log_freq_range[0] > cfg.log_freq_range[1]
            else []
        ),
        *(
            [f"--log-value-range {cfg.log_value_range} has LOW > HIGH"]
            if cfg.log_value_range[0] > cfg.log_value_range[1]
            else []
        ),
    ]
    if problems:
        raise UserError("; ".join(problems) + ".")


# ----------------------------------------------------------------------------------------------------------------
# Which latents
# ----------------------------------------------------------------------------------------------------------------


def select_latents(
    cache: top_images.TopKCache,
    log_freq_range: tuple[float, float],
    log_value_range: tuple[float, float],
    include_latents=(),
    n_latents: int = 400,
    seed: int = 42,
    linked=(),
) -> Int[np.ndarray, " n"]:
    """``include_latents`` (in the given order), then up to ``n_latents`` others drawn at random (seeded) among the
    latents whose log10 frequency and log10 mean value lie in the closed ranges, in id order, then the ``linked``
    latents (those the page's class and probe tables name) not already there, in id order: the draw is the same
    with or without them. Dead latents (never fired) are never selected: an included one is skipped with a
    warning."""
    alive = cache.freq > 0
    bad = [i for i in include_latents if not 0 <= i < cache.d_sae]
    if bad:
        raise UserError(f"--include-latents {bad} are not latents of this SAE (ids 0..{cache.d_sae - 1}).")
    dead = [i for i in include_latents if not alive[i]]
    if dead:
        logger.warning("--include-latents %s never fire on this layer; they are left out", dead)
    included = list(dict.fromkeys(i for i in include_latents if alive[i]))
    with np.errstate(divide="ignore"):
        log_freq, log_value = np.log10(cache.freq), np.log10(cache.mean_value)
    passes = (
        alive
        & (log_freq >= log_freq_range[0])
        & (log_freq <= log_freq_range[1])
        & (log_value >= log_value_range[0])
        & (log_value <= log_value_range[1])
    )
    passes[included] = False
    candidates = np.flatnonzero(passes)
    picked = np.random.default_rng(seed).choice(candidates, size=min(n_latents, len(candidates)), replace=False)
    chosen = [*included, *np.sort(picked).tolist()]
    extra = sorted(set(int(j) for j in linked if alive[j]) - set(chosen))
    return np.array(chosen + extra, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _image_root(cfg: config.VisualsConfig, store: ActivationStore) -> str:
    """Where the store's images are now: --images.root (checked against the store's image fingerprint) or the
    folder recorded in the store."""
    if cfg.images is None:
        root = store.metadata.image_root
        if root is None or not os.path.isdir(root):
            raise UserError(
                f"The images of the store {store.path} are not at {root!r} any more; pass "
                "images:image-folder-dataset --images.root DIR with the folder they moved to."
            )
        return root
    source = images.make_image_source(cfg.images, None, store.n_imgs)
    if images.image_list_fingerprint(source) != store.metadata.fingerprints["images"]:
        raise UserError(
            f"The images in {source.root} are not the ones the store {store.path} was recorded from (different "
            "names, sizes or modification times). Pass the folder the store was recorded from, or a copy that keeps "
            "the timestamps (cp -a, rsync -a)."
        )
    return source.root


def render_latents(
    cache: top_images.TopKCache,
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
            heatmaps.save_png(img, os.path.join(dump_to, gallery.original_relpath(rank)))
            return
        out = draw_top_image(cache, latent, rank, load(int(cache.top_images[latent, rank])), grid)
        heatmaps.save_png(out, os.path.join(dump_to, gallery.image_relpath(latent, rank)))

    _remove_stale(dump_to, counts, set(originals))
    with (
        concurrent.futures.ThreadPoolExecutor(threads.usable_cpus()) as pool,
        tqdm(total=len(jobs) + len(originals), unit="img", desc="heatmaps", disable=not show_progress) as bar,
    ):
        for _ in pool.map(render, [(-1, i) for i in originals] + jobs):
            bar.update()
    context = _RowContext(cache, store, dump_to, views, grid, probe)
    return [context.row(int(latent), counts[int(latent)]) for latent in latents]


def _remove_stale(dump_to: str, n_images: dict[int, int], originals: set[int] = frozenset()) -> None:
    """Make neurons/ and originals/ hold exactly this selection: folders of latents no longer selected, ranks
    beyond what is rendered now and originals no heatmap shows go (only the names this module writes: numeric
    folders, <rank>.png, metadata.json, <image>.png)."""
    root = os.path.join(dump_to, gallery.NEURONS_DIR)
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
    plain = os.path.join(dump_to, gallery.ORIGINALS_DIR)
    os.makedirs(plain, exist_ok=True)
    for name in os.listdir(plain):
        if name.endswith(".png") and name[:-4].isdigit() and int(name[:-4]) not in originals:
            os.remove(os.path.join(plain, name))


@dataclasses.dataclass
class _RowContext:
    """What every gallery row reads: the cache, the store's image index and patch labels, the rendered pictures'
    sizes and crop boxes, and the probe."""

    cache: top_images.TopKCache
    store: ActivationStore
    dump_to: str
    views: dict[int, tuple[tuple[int, int], heatmaps.Box]]
    grid: tuple[int, int]
    probe: patch_classes.ProbeView | None

    def __post_init__(self):
        self.paths, self.labels, self.class_names = (
            self.store.image_paths(),
            self.store.image_labels(),
            self.store.class_names,
        )
        self.patch_labels, self.patch_names = self.store.patch_labels(), self.store.patch_class_names
        self.filled = self.cache.n_images()

    def row(self, latent: int, n: int) -> dict:
        """Write the latent's metadata.json and return its gallery row."""
        cache = self.cache
        imgs = cache.top_images[latent, :n].tolist()
        names = [self.class_names[self.labels[i]] if 0 <= self.labels[i] < len(self.class_names) else "" for i in imgs]
        log_freq, log_value = math.log10(cache.freq[latent]), math.log10(cache.mean_value[latent])
        outline = self._outline(latent, imgs)
        atomic_write_json(
            inside(self.dump_to, gallery.NEURONS_DIR, str(latent), "metadata.json", what="latent id"),
            {
                "latent": latent,
                "log10_freq": log_freq,
                "log10_mean_value": log_value,
                "max_value": float(cache.top_values[latent, 0]),
                "n_top": int(self.filled[latent]),
                "image_indices": imgs,
                "paths": [self.paths[i] for i in imgs],
                "labels": names,
                "values": cache.top_values[latent, :n].tolist(),
                "cls_values": [_finite_or_none(v) for v in cache.top_cls[latent, :n]],
                "originals": [gallery.original_relpath(i) for i in imgs],
                "outline": None if outline is None else {"class": outline[0], "source": outline[1]},
            },
        )
        sizes = []
        for rank, i in enumerate(imgs):
            width, height = self.views[i][0]
            strip = heatmaps.cls_strip_height(height) if np.isfinite(cache.top_cls[latent, rank]) else 0
            sizes.append((width, height, height + strip))
        row = {
            "latent": latent,
            "log10_freq": log_freq,
            "log10_mean_value": log_value,
            "max_value": float(cache.top_values[latent, 0]),
            "n_heatmaps": n,
            "n_top": int(self.filled[latent]),
            "images": [gallery.image_relpath(latent, rank) for rank in range(n)],
            "labels": names,
            "originals": [gallery.original_relpath(i) for i in imgs],
            "sizes": sizes,
            "hist_counts": cache.hist[latent],
            "hist_edges": top_images.HIST_EDGES,
        }
        if outline is not None:
            row["outline_class"], row["outline_source"], row["outlines"] = outline
        if self.probe is not None:
            row["probe"] = [
                {"class": c.get("class"), "ap": c.get("ap"), "purity_at_k": c.get("purity_at_k")}
                for c in self.probe.classes_of(latent)
            ]
        return row

    def _outline(self, latent: int, imgs: list[int]) -> tuple[str, str, list[str]] | None:
        """(class name, why, SVG path per image) of the class outlined on the latent's heatmaps, or None."""
        labels = self.patch_labels
        if labels is None or not imgs or labels.shape[1] != self.grid[0] * self.grid[1]:
            return None
        rows = labels[imgs].astype(np.int64)
        found = patch_classes.outline_class(
            latent, self.probe, self.cache.top_patches[latent, : len(imgs)], rows, self.patch_names
        )
        if found is None:
            return None
        c, why = found
        outlines = [
            patch_classes.outline_path((r == c).reshape(self.grid), self.views[i][1]) for r, i in zip(rows, imgs)
        ]
        return self.patch_names[c], why, outlines


def draw_top_image(
    cache: top_images.TopKCache, latent: int, rank: int, view: tuple[Image.Image, heatmaps.Box], grid: tuple[int, int]
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
        cls_value=_finite_or_none(cache.top_cls[latent, rank]),
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


def _finite_or_none(x: Float[np.floating, ""] | float) -> float | None:
    return float(x) if np.isfinite(x) else None
