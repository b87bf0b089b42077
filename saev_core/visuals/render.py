"""The visuals job: SAE checkpoint + store layer -> top-k cache -> latent selection -> heatmaps -> gallery page.

``python -m saev_core visuals`` and the ``topk_visuals`` Dagster asset both call ``make_visuals``. The pass lives in
``top_images`` and its cache in ``topk_cache``, the class association in ``association`` (its files in
``association_cache``), which latents in ``selection``, their pictures in ``latent_images`` (overlays:
``heatmaps``), their gallery rows in ``latent_rows``, the page in ``gallery``; this module runs them in order,
writes the selection and checks a finished folder (docs/visuals-format.md):

    <dump_to>/cache/topk.npz            the top-k arrays and statistics (reused when the inputs are the same)
    <dump_to>/cache/selection.json      the selected latents and the filters that chose them
    <dump_to>/neurons/<latent>/<rank>.png, metadata.json
    <dump_to>/originals/<image>.png     the pictures under the heatmaps, without them (one per store image)
    <dump_to>/index.html                the gallery
"""

import dataclasses
import logging
import os

import numpy as np

from saev_core import config, nn
from saev_core.errors import UserError
from saev_core.files import atomic_write_json, check_output_folder, read_json
from saev_core.nn import trained_on
from saev_core.record import images
from saev_core.store import ActivationStore
from saev_core.visuals import (
    association,
    association_cache,
    gallery,
    latent_images,
    latent_rows,
    patch_classes,
    selection,
    top_images,
    topk_cache,
)
from saev_core.visuals.gallery_layout import NEURONS_DIR, original_relpath

logger = logging.getLogger("saev_core.visuals.render")
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
    identity = topk_cache.CacheIdentity(
        topk_cache.file_sha256(inputs.ckpt_path), inputs.store.metadata.key, inputs.layer, inputs.patches, cfg.top_k
    )
    cache = topk_cache.load_cache(cfg.dump_to, identity)
    reused = cache is not None
    with_classes = association.has_classes(inputs.store)
    assoc = association_cache.load(cfg.dump_to, identity) if with_classes else None
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
        topk_cache.save_cache(cache, cfg.dump_to)
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
        association_cache.save(assoc, identity, cfg.dump_to, cache.freq > 0)
    logger.info("top-k cache %s (%s)", topk_cache.cache_path(cfg.dump_to), "reused" if reused else "computed")
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
    linked = selection.linked_latents(cache, class_latents, probe)
    latents = selection.select_latents(
        cache, cfg.log_freq_range, cfg.log_value_range, cfg.include_latents, cfg.n_latents, cfg.seed, linked
    )
    rows = latent_images.render_latents(
        cache, latents, inputs.store, image_root, cfg.dump_to, cfg.n_imgs_per_latent, show_progress, probe
    )
    if assoc is not None:
        latent_rows.add_classes(rows, assoc)
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


def selection_path(dump_to: str) -> str:
    return os.path.join(dump_to, "cache", "selection.json")


def missing_images(dump_to: str) -> list[str]:
    """What is missing for the selection in dump_to to be complete: every selected latent's heatmaps (as many as
    selection.json says) and its metadata.json. Empty when complete."""
    chosen = read_json(selection_path(dump_to))
    if chosen is None:
        return [f"no {selection_path(dump_to)}: the visuals never finished"]
    missing, originals = [], {}
    for latent, n in zip(chosen["latents"], chosen.get("n_heatmaps", chosen.get("n_images"))):
        folder = os.path.join(dump_to, NEURONS_DIR, str(latent))
        names = [f"{rank}.png" for rank in range(n)] + ["metadata.json"]
        missing += [os.path.join(folder, name) for name in names if not os.path.isfile(os.path.join(folder, name))]
        try:
            shown = (read_json(os.path.join(folder, "metadata.json")) or {}).get("image_indices", [])[:n]
        except ValueError:
            missing.append(f"{os.path.join(folder, 'metadata.json')} (damaged)")
            shown = []
        originals.update(dict.fromkeys(os.path.join(dump_to, original_relpath(i)) for i in shown))
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
