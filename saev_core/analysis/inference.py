"""Inference on new images: which SAE latents fire where, for images that were never recorded.

``explain(images, ckpt)`` runs the ViT the checkpoint was trained on (family, weights, layer and token mode from
its provenance), encodes every patch with the SAE (which applies its own saved normalisation) and returns, per
image, the latent values of every patch, the image's top latents and their heatmaps (``heatmaps.overlay_heatmap``,
the gallery's renderer). ``Explainer`` holds the ViT and the SAE so that many calls (the explorer app) build them
once. A saev 0.1.0 file records none of this: pass ``vit_family``, ``vit_ckpt``, ``layer`` (and ``store`` for its
normalisation).
"""

import dataclasses
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from PIL import Image

from saev_core import config, nn, threads
from saev_core.errors import UserError
from saev_core.nn import checkpoint
from saev_core.record import images as imagelib
from saev_core.record import vit as vitlib
from saev_core.visuals import heatmaps

logger = logging.getLogger("saev_core.analysis.inference")
RANK_MODES = ("patches", "cls", "meanpool")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What inference needs to know about how the SAE was trained."""

    vit_family: str
    vit_ckpt: str
    layer: int
    """The ViT block whose output the SAE reads (negative counts from the end)."""
    token_mode: str
    """patches, cls or meanpool: which vector ranks an image for a latent."""


@dataclasses.dataclass
class Explanation:
    """The latents of a batch of images; ``top_*`` rows are in decreasing order of the ranking value."""

    patch_values: Float[np.ndarray, "imgs n_patches d_sae"]
    """Every latent's value on every patch (raster order over the patch grid)."""
    cls_values: Float[np.ndarray, "imgs d_sae"] | None
    """Every latent's value on the CLS token (None when the ViT has none)."""
    image_values: Float[np.ndarray, "imgs d_sae"]
    """The ranking value of each latent for each image: best patch (patches), CLS value (cls), or the latent of
    the mean patch vector (meanpool)."""
    top_latents: Int[np.ndarray, "imgs top_n"]
    top_values: Float[np.ndarray, "imgs top_n"]
    heatmaps: list[list[Image.Image]]
    """heatmaps[i][j]: image i with latent top_latents[i, j] drawn over it."""
    grid: tuple[int, int]


def spec_from_checkpoint(
    sae: nn.SparseAutoencoder,
    ckpt_path: str,
    vit_family: str | None = None,
    vit_ckpt: str | None = None,
    layer: int | None = None,
    token_mode: str | None = None,
) -> ModelSpec:
    """Arguments first, then the checkpoint's provenance; a missing piece is a UserError that names the argument."""
    prov = sae.provenance
    family = vit_family or prov.get("vit_family")
    ckpt = vit_ckpt or prov.get("vit_ckpt")
    layer = layer if layer is not None else prov.get("layer")
    token_mode = token_mode or prov.get("token_mode") or "patches"
    missing = [name for name, value in (("vit_family", family), ("vit_ckpt", ckpt), ("layer", layer)) if value is None]
    if missing:
        raise UserError(
            f"The checkpoint {ckpt_path} does not say which ViT it reads (a saev 0.1.0 file, or one from elsewhere); "
            f"name it explicitly: {', '.join(missing)} (e.g. vit_family='clip', vit_ckpt='ViT-B-32/openai', "
            "layer=-2; on the command line --vit-family, --vit-ckpt, --layer)."
        )
    if token_mode not in RANK_MODES:
        raise UserError(f"token_mode {token_mode!r} of {ckpt_path} is not one of {', '.join(RANK_MODES)}.")
    return ModelSpec(family, findable_ckpt(family, ckpt, prov), int(layer), token_mode)


def findable_ckpt(family: str, ckpt: str, prov: dict) -> str:
    """The ViT checkpoint string, with a relative weights path (checkpoints written before provenance stored
    absolute paths) tried against the current folder, then the store's parent folders."""
    from saev_core.record.checkpoints import parse_ckpt

    arch, _, rest = ckpt.partition("/")
    ref = parse_ckpt(family, ckpt, must_exist=False)
    if ref.path is None or os.path.isfile(ref.path):
        return ckpt
    store = prov.get("store")
    if store and not os.path.isabs(rest) and "://" not in store:
        folder = os.path.dirname(os.path.abspath(store))
        for _ in range(3):  # <dump_to>/<key>: the run folder is one or two levels up
            candidate = os.path.join(folder, rest)
            if os.path.isfile(candidate):
                return f"{arch}/{os.path.abspath(candidate)}"
            folder = os.path.dirname(folder)
    raise UserError(
        f"The ViT weights {ref.path} (vit_ckpt {ckpt!r} in the SAE's provenance) are not there any more; "
        "pass vit_ckpt (--vit-ckpt ARCH/path/to/weights) with where they are now."
    )


def _as_image(item) -> Image.Image:
    """A PIL image, or a path to one, as the 8-bit RGB that recording sees (EXIF orientation, alpha on white)."""
    if isinstance(item, Image.Image):
        return imagelib.to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        try:
            return imagelib.load_rgb(item)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for unreadable files
            raise UserError(
                f"Cannot read the image {os.fspath(item)!r} ({type(err).__name__}: {err}); pass a PNG, "
                "JPEG or another format Pillow reads."
            ) from None
    raise UserError(f"Cannot use a {type(item).__name__} as an image; pass PIL images or file paths.")


class Explainer:
    """A ViT and an SAE, ready to explain images (built once; ``__call__`` as often as needed)."""

    def __init__(self, sae: nn.SparseAutoencoder, spec: ModelSpec, device: str = "cpu", n_threads: int | None = None):
        self.sae = sae.to(device).eval()
        self.tuner = threads.tuner_for(n_threads, device)  # torch's CPU threads, timed over every call's batches
        self.spec = spec
        self.device = device
        vit = vitlib.make_vit(spec.vit_family, spec.vit_ckpt).to(device)
        if vit.d_vit != sae.cfg.d_vit:
            raise UserError(
                f"The SAE reads {sae.cfg.d_vit}-d activations but {spec.vit_ckpt} is {vit.d_vit} wide; "
                "pass the ViT the SAE was trained on (vit_ckpt)."
            )
        if spec.token_mode == "cls" and not vit.has_cls:
            raise UserError(f"token_mode cls needs a CLS token, but {spec.vit_ckpt} has none.")
        self.recorder = vitlib.RecordedVisionTransformer(vit, None, vit.has_cls, [spec.layer])
        self.transform = vitlib.make_img_transform(spec.vit_family, spec.vit_ckpt)
        self.geometry = heatmaps.geometry_of_transform(self.transform)
        self.grid = vit.grid
        self.first = int(vit.has_cls)
        self.n_blocks = vit.n_blocks
        self.input_shape = tuple(self.transform(Image.new("RGB", (64, 64))).shape)
        """(3, height, width) of one image as the ViT takes it: what ``latents`` accepts."""

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: str | os.PathLike,
        device: str = "auto",
        *,
        vit_family: str | None = None,
        vit_ckpt: str | None = None,
        layer: int | None = None,
        token_mode: str | None = None,
        store: str | None = None,
        n_threads: int | None = None,
        allow_layer_mismatch: bool = False,
    ) -> "Explainer":
        device = config.resolve_device(device)
        sae = nn.load(ckpt, device=device)
        spec = spec_from_checkpoint(sae, os.fspath(ckpt), vit_family, vit_ckpt, layer, token_mode)
        if sae.saved_no_normalization:
            _legacy_normalization(sae, spec, store or None, os.fspath(ckpt))
        explainer = cls(sae, spec, device, n_threads)
        if layer is not None and not allow_layer_mismatch:  # compared as blocks of this ViT: -1 and 11 are one layer
            checkpoint.check_trained_layer(
                layer, sae.provenance, os.fspath(ckpt), "layer=", "allow_layer_mismatch=True", explainer.n_blocks
            )
        return explainer

    @torch.inference_mode()
    def latents(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(patch latents [imgs, n_patches, d_sae], CLS latents [imgs, d_sae] or None, ranking values [imgs, d_sae])
        of ``pixels`` [imgs, 3, h, w] made by ``self.transform`` (checked here, with one message, rather than by the
        annotation, so that callers without runtime type checks get it too)."""
        shape = tuple(getattr(pixels, "shape", ()))
        if not isinstance(pixels, torch.Tensor) or len(shape) != 4 or shape[1:] != self.input_shape or not shape[0]:
            raise UserError(
                f"Explainer.latents takes a tensor [images, {', '.join(map(str, self.input_shape))}] (images made by "
                f"explainer.transform), not {type(pixels).__name__} of shape {list(shape)}; call the explainer on PIL "
                "images or file paths to have them transformed."
            )
        _, acts = self.recorder(pixels.to(self.device))
        x = acts[:, 0]
        patch_f = self.sae.encode(x[:, self.first :].reshape(-1, x.shape[-1])).reshape(len(x), -1, self.sae.cfg.d_sae)
        cls_f = self.sae.encode(x[:, 0]) if self.first else None
        if self.spec.token_mode == "cls":
            rank = cls_f
        elif self.spec.token_mode == "meanpool":
            rank = self.sae.encode(x[:, self.first :].mean(dim=1))
        else:
            rank = patch_f.amax(dim=1)
        return patch_f, cls_f, rank

    def __call__(
        self,
        images: Sequence | Image.Image | str | os.PathLike,
        top_n: int = 5,
        batch_size: int = 32,
        heatmap_side: int | None = 224,
    ) -> Explanation:
        """Explain ``images`` (PIL images or paths) in batches of ``batch_size``."""
        if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
            raise UserError(f"top_n {top_n!r} must be a whole number >= 1.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size {batch_size!r} must be a whole number >= 1.")
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]  # one image, not a sequence of them (a path would otherwise be read letter by letter)
        pil = [_as_image(item) for item in images]
        if not pil:
            raise UserError("No images to explain: pass a list of PIL images or file paths (it was empty).")
        parts = []
        with threads.apply(self.tuner):
            for start in range(0, len(pil), batch_size):
                pixels = torch.stack([self.transform(img) for img in pil[start : start + batch_size]])
                parts.append([t.float().cpu().numpy() if t is not None else None for t in self.latents(pixels)])
                self.tuner.step_done(len(pixels))
            self.tuner.settle()
        patch_values = np.concatenate([p[0] for p in parts])
        cls_values = np.concatenate([p[1] for p in parts]) if self.first else None
        image_values = np.concatenate([p[2] for p in parts])
        n = min(top_n, image_values.shape[1])
        top = np.argsort(-image_values, axis=1, kind="stable")[:, :n]
        top_values = np.take_along_axis(image_values, top, axis=1)
        drawn = [
            [
                self.heatmap(
                    img,
                    patch_values[i, :, latent],
                    None if cls_values is None else float(cls_values[i, latent]),
                    heatmap_side,
                )
                for latent in top[i]
            ]
            for i, img in enumerate(pil)
        ]
        return Explanation(patch_values, cls_values, image_values, top, top_values, drawn, self.grid)

    def heatmap(
        self,
        img: Image.Image,
        values: np.ndarray,
        cls_value: float | None = None,
        shortest_side: int | None = 224,
        vmax: float | None = None,
    ) -> Image.Image:
        """``img`` with one latent's patch values drawn over the region the ViT saw (the gallery's rule); vmax
        defaults to the image's own maximum for that latent."""
        n_patches = self.grid[0] * self.grid[1]
        if np.shape(values) != (n_patches,):
            raise UserError(
                f"Explainer.heatmap takes one latent's value per patch, shape [{n_patches}] (a {self.grid[0]}x"
                f"{self.grid[1]} grid), not shape {list(np.shape(values))}; pass "
                "explanation.patch_values[i, :, latent]."
            )
        values = np.asarray(values)
        top = float(max(values.max(initial=0.0), cls_value or 0.0)) if vmax is None else vmax
        box = self.geometry.crop_box(*img.size)
        return heatmaps.overlay_heatmap(
            img, values, self.grid, box, top, shortest_side=shortest_side, cls_value=cls_value
        )


def _legacy_normalization(sae: nn.SparseAutoencoder, spec: ModelSpec, store: str | None, ckpt: str) -> None:
    """A saev 0.1.0 file was trained on normalised activations but saves no statistics: take them from the store."""
    if store is None:
        logger.warning(
            "%s carries no normalisation statistics (saev 0.1.0); without store= the raw activations go in "
            "unnormalised, which is not what saev trained it on",
            ckpt,
        )
        return
    from saev_core.store import ActivationStore, stats

    opened = ActivationStore.open(store)
    stats.set_store_normalization(sae, opened, opened.recorded_layer(spec.layer), spec.token_mode)


def explain(
    images: Sequence | Image.Image | str | os.PathLike,
    ckpt: str | os.PathLike,
    top_n: int = 5,
    device: str = "auto",
    batch_size: int = 32,
    **spec,
) -> Explanation:
    """Per-patch latent values, each image's ``top_n`` latents and their heatmaps, for ``images`` (PIL images or
    paths; one image alone works too). ``spec`` may name ``vit_family``, ``vit_ckpt``, ``layer``, ``token_mode`` and
    ``store`` (required for a saev 0.1.0 file: its ViT; optional for ours: they override the provenance; a layer other
    than the SAE's needs ``allow_layer_mismatch=True``), and ``n_threads`` torch's CPU threads (None: timed and
    picked, ``saev_core.threads``)."""
    return Explainer.from_checkpoint(ckpt, device, **spec)(images, top_n=top_n, batch_size=batch_size)
