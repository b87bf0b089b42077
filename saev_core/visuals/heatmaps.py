"""Heatmap overlays: a latent's patch activations drawn over the ORIGINAL image (not the ViT's crop).

Geometry. The ViT saw the image after its eval transform: a resize (shortest side, squash, or keep-ratio) and a
centre crop (padded when the crop is larger). The crop covers a box of the original image, and the patch grid
tiles that box evenly. ``ViewGeometry`` holds the transform's numbers (read once per run with
``geometry_of_transform``, or rebuilt from stored numbers) and maps an original ``(width, height)`` to that box in
original pixel coordinates, with the same integer rounding as torchvision, open_clip and timm.

Overlay. Each pixel whose centre lies in patch ``(r, c)`` of the box gets that patch's colour (a matplotlib
colormap) with alpha ``max_alpha * clip(value / vmax, 0, 1) ** alpha_gamma``; ``vmax`` is the latent's top value
so the ranks of one latent compare. Zero, negative and NaN patches, and pixels outside the box, are left exactly as
they were. The image is first shrunk so that its shortest side is at most ``shortest_side`` (never enlarged), so
thousands of images render in seconds.

Imports no torch: transforms are recognised by class name and attributes.
"""

import dataclasses
import functools
import os
import zlib
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from PIL import Image

from saev_core.files import atomic_write
from saev_core.record.segmentation import NON_GEOMETRIC_STEPS

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in pixel coordinates; right and bottom are exclusive edges."""

_NON_GEOMETRIC = NON_GEOMETRIC_STEPS
"""Transform steps that do not move pixels (one list, shared with the masks of segmentation sources)."""


def _pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, (tuple, list)) and len(size) == 1:
        return int(size[0]), int(size[0])
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be an int or a (height, width) pair, got {size!r}")


@dataclasses.dataclass(frozen=True)
class ViewGeometry:
    """Where the ViT's input came from in the original image: a resize, then an optional centre crop.

    ``ViewGeometry(resize=224, crop=224)`` is open_clip's default (shortest side to 224, centre crop 224);
    ``ViewGeometry(resize=(224, 224))`` is a squash (SigLIP); ``ViewGeometry(resize=(224, 224), crop=224,
    longest=1.0)`` is open_clip's ``resize_mode="longest"`` (keep ratio, longest side fits, pad). All fields are
    plain numbers, so ``dataclasses.asdict`` round-trips through JSON; pairs are stored as tuples (lists are
    accepted and converted)."""

    resize: int | Sequence[int] | None
    """int: the shortest side becomes this (torchvision ``Resize(int)``); (height, width): squash to that size, or,
    with ``longest`` set, the target of a keep-ratio resize; None: no resize."""
    crop: int | Sequence[int] | None = None
    """(height, width) of the centre crop after the resize (an int means a square); None: no crop. A crop larger
    than the resized image pads it, so the box then reaches past the original image."""
    longest: float | None = None
    """Keep-ratio resize (open_clip/timm ``ResizeKeepRatio``): 0 fits the shortest side, 1 the longest."""

    def __post_init__(self):
        resize = self.resize
        if isinstance(resize, (list, tuple)) and len(resize) == 1:  # torchvision: Resize([s]) is Resize(s)
            resize = resize[0]
        if isinstance(resize, (int, np.integer)) and not isinstance(resize, bool):
            object.__setattr__(self, "resize", int(resize))
        elif resize is not None:
            object.__setattr__(self, "resize", _pair(resize, "ViewGeometry.resize"))
        if self.crop is not None:
            object.__setattr__(self, "crop", _pair(self.crop, "ViewGeometry.crop"))
        if isinstance(self.resize, int) and self.resize <= 0:
            raise ValueError(f"ViewGeometry.resize must be positive, got {self.resize}")
        if self.longest is not None:
            if not isinstance(self.resize, tuple):
                raise ValueError(f"ViewGeometry.longest needs resize=(height, width), got resize={self.resize!r}")
            if not 0.0 <= self.longest <= 1.0:
                raise ValueError(f"ViewGeometry.longest must be in [0, 1], got {self.longest}")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image after the resize step, rounded as the libraries round."""
        if self.resize is None:
            return width, height
        if isinstance(self.resize, int):  # torchvision: the long side is truncated, not rounded
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(self.resize * long / short)
            return (self.resize, new_long) if width <= height else (new_long, self.resize)
        target_h, target_w = self.resize
        if self.longest is None:
            return target_w, target_h
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) * self.longest + min(ratio_h, ratio_w) * (1.0 - self.longest)
        return round(width / ratio), round(height / ratio)

    def crop_box(self, width: int, height: int) -> Box:
        """The box of the original ``width x height`` image that the ViT's input covers, in original pixels."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        rw, rh = self.resized_size(width, height)
        if self.crop is None:
            left, top, right, bottom = 0, 0, rw, rh
        else:
            crop_h, crop_w = self.crop
            left, top = _crop_offset(rw, crop_w), _crop_offset(rh, crop_h)
            right, bottom = left + crop_w, top + crop_h
        sx, sy = width / rw, height / rh
        return left * sx, top * sy, right * sx, bottom * sy


def _crop_offset(size: int, crop: int) -> int:
    """Offset of a centre crop in one dimension, as torchvision's ``center_crop`` (negative: padded before)."""
    if crop > size:  # padded by (crop - size) // 2 before, then the crop is the whole padded image
        return -((crop - size) // 2)
    return int(round((size - crop) / 2.0))


def geometry_of_transform(transform) -> ViewGeometry:
    """Read the resize and centre crop out of an eval transform (a ``Compose``, a list, or one step).

    Handles torchvision ``Resize`` and ``CenterCrop``, open_clip's and timm's ``ResizeKeepRatio`` and
    ``CenterCropOrPad`` (what ``open_clip.transform.image_transform_v2`` and timm's ``create_transform`` build for
    eval); steps that do not move pixels (to-tensor, normalise, mode conversion) are skipped. Anything else raises
    ValueError naming the step: an overlay drawn with a wrong geometry would point at the wrong place."""
    steps = getattr(transform, "transforms", transform)
    if not isinstance(steps, (list, tuple)):
        steps = [steps]
    resize, crop, longest = None, None, None
    for step in steps:
        name = getattr(step, "__name__", None) or type(step).__name__
        if name in _NON_GEOMETRIC:
            continue
        if crop is not None or (resize is not None and name in ("Resize", "ResizeKeepRatio")):
            raise ValueError(
                f"cannot map transform step {step!r}: only one resize followed by one centre crop is "
                f"supported, and this step comes after {'the crop' if crop else 'a resize'}"
            )
        if name == "Resize":
            if getattr(step, "max_size", None) is not None:
                raise ValueError(f"cannot map transform step {step!r}: Resize with max_size is not supported")
            resize = step.size
        elif name == "ResizeKeepRatio":
            if getattr(step, "random_scale_prob", 0) or getattr(step, "random_aspect_prob", 0):
                raise ValueError(f"cannot map transform step {step!r}: random scale/aspect is a training transform")
            resize, longest = step.size, float(step.longest)
        elif name in ("CenterCrop", "CenterCropOrPad"):
            crop = step.size
        else:
            raise ValueError(
                f"cannot map transform step {step!r} ({type(step).__module__}.{name}) to a crop box; "
                "supported: Resize, ResizeKeepRatio, CenterCrop, CenterCropOrPad. Build a ViewGeometry "
                "by hand if you know what it does."
            )
    return ViewGeometry(resize=resize, crop=crop, longest=longest)


@functools.lru_cache(maxsize=16)
def colormap_lut(cmap: str) -> np.ndarray:
    """uint8 [256, 3] RGB lookup table of a matplotlib colormap (built once per name)."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(
            f"unknown matplotlib colormap {cmap!r}; try 'plasma', 'viridis', 'magma' or 'inferno'"
        ) from None
    rgba = colormap.resampled(256)(np.arange(256))
    lut = np.rint(rgba[:, :3] * 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def fit_shortest_side(img: Image.Image, shortest_side: int | None) -> Image.Image:
    """``img`` shrunk so that its shortest side is ``shortest_side`` (never enlarged; None: unchanged)."""
    width, height = img.size
    if shortest_side is None or min(width, height) <= shortest_side:
        return img
    scale = shortest_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a fast integer reduce first, then a bilinear resample from about twice the final size.
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def _patch_runs(n_pixels: int, lo: float, hi: float, n_patches: int) -> tuple[int, int, np.ndarray]:
    """Along one axis: the pixels ``[start, stop)`` whose centres lie in ``[lo, hi)``, and how many of them fall
    in each of the ``n_patches`` equal parts (pixel centres decide: nearest-neighbour, like block upsampling)."""
    centres = np.arange(n_pixels, dtype=np.float64) + 0.5
    idx = np.floor((centres - lo) * (n_patches / (hi - lo))).astype(np.int64)
    inside = np.flatnonzero((idx >= 0) & (idx < n_patches))
    if inside.size == 0:
        return 0, 0, np.zeros(n_patches, dtype=np.int64)
    start, stop = int(inside[0]), int(inside[-1]) + 1
    return start, stop, np.bincount(idx[start:stop], minlength=n_patches)


def overlay_heatmap(
    img: Image.Image,
    values: Float[np.ndarray, " n_patches"],
    grid: tuple[int, int],
    box: Box,
    vmax: float,
    cmap: str = "plasma",
    max_alpha: float = 0.6,
    alpha_gamma: float = 1.0,
    shortest_side: int | None = 224,
    cls_value: float | None = None,
) -> Image.Image:
    """``img`` (the original, RGB) with ``values`` (one per patch, row-major over ``grid = (rows, cols)``) drawn
    over ``box`` (original pixels, from ``ViewGeometry.crop_box``). Returns a new RGB image whose shortest side is
    at most ``shortest_side``; see the module docstring for the colour and alpha rule. With ``cls_value`` (the
    latent on the CLS token) a strip is added below the image, coloured by the same rule (dark grey at zero)."""
    rows, cols = grid
    if rows <= 0 or cols <= 0 or values.shape != (rows * cols,):
        raise ValueError(f"values has shape {values.shape}, but grid {grid} needs ({rows * cols},)")
    if not 0.0 <= max_alpha <= 1.0:
        raise ValueError(f"max_alpha must be in [0, 1], got {max_alpha}")
    if not alpha_gamma > 0:
        raise ValueError(f"alpha_gamma must be positive, got {alpha_gamma}")
    left, top, right, bottom = box
    if not (right > left and bottom > top):
        raise ValueError(f"box {box} is empty; expected (left, top, right, bottom) with right > left, bottom > top")
    if img.mode != "RGB":
        img = img.convert("RGB")
    orig_w, orig_h = img.size
    img = fit_shortest_side(img, shortest_side)
    width, height = img.size
    sx, sy = width / orig_w, height / orig_h

    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    strength = np.clip(values / vmax, 0.0, 1.0) if vmax > 0 and np.isfinite(vmax) else np.zeros_like(values)
    out = np.array(img, dtype=np.uint8)  # a writable copy
    y0, y1, row_runs = _patch_runs(height, top * sy, bottom * sy, rows)
    x0, x1, col_runs = _patch_runs(width, left * sx, right * sx, cols)
    if y1 == y0 or x1 == x0 or not strength.any():
        return _with_cls_strip(out, cls_value, vmax, cmap)

    # Per patch: keep = 1 - alpha and add = alpha * colour, then blown up to pixels by repeating whole blocks.
    # alpha_gamma < 1 lifts the opacity of middling values (the colour still says the value), so weak patches show.
    alpha = (strength**alpha_gamma * max_alpha).astype(np.float32).reshape(rows, cols, 1)
    colour = colormap_lut(cmap)[np.rint(strength * 255).astype(np.intp)].astype(np.float32).reshape(rows, cols, 3)
    keep = np.repeat(np.repeat(1.0 - alpha, row_runs, axis=0), col_runs, axis=1)
    add = np.repeat(np.repeat(alpha * colour, row_runs, axis=0), col_runs, axis=1)
    # Where alpha is 0 this is pixel * 1 + 0, exactly the pixel again after rounding.
    region = out[y0:y1, x0:x1]
    region[...] = np.rint(region.astype(np.float32) * keep + add).astype(np.uint8)
    return _with_cls_strip(out, cls_value, vmax, cmap)


CLS_STRIP_FRACTION = 0.06
"""Height of the CLS strip as a fraction of the image height (at least 4 px)."""


def cls_strip_height(picture_height: int) -> int:
    """Height in pixels of the CLS strip under a picture of this height."""
    return max(4, round(picture_height * CLS_STRIP_FRACTION))


def _with_cls_strip(out: np.ndarray, cls_value: float | None, vmax: float, cmap: str) -> Image.Image:
    """The image, with a strip below it showing the CLS token's value (none when cls_value is None)."""
    if cls_value is None:
        return Image.fromarray(out)
    strength = float(np.clip(cls_value / vmax, 0.0, 1.0)) if vmax > 0 and np.isfinite(cls_value) else 0.0
    grey = np.full(3, 64.0)
    colour = colormap_lut(cmap)[int(round(strength * 255))].astype(np.float64)
    alpha = strength  # a strip of its own: no image under it to keep visible
    strip = np.empty((cls_strip_height(out.shape[0]), out.shape[1], 3), np.uint8)
    strip[...] = np.rint(grey * (1 - alpha) + colour * alpha).astype(np.uint8)
    return Image.fromarray(np.concatenate([out, strip], axis=0))


def save_png(img: Image.Image, path: str | os.PathLike) -> str:
    """Write ``img`` as PNG at ``path`` atomically (``files.atomic_write``), so a reader or a killed run never sees
    half a file. Not durable (no fsync): fsync halves the rate (measured 180 -> 95 files/s), and heatmaps are cheap
    to render again after a power loss. Fast compression: these files are many and are viewed, not archived. After
    PNG's row filters, photos have few repeated strings, so Huffman-only coding is about 1.5x faster than zlib
    level 1 and gives files no larger (measured: 127 vs 139 KB at 224x298)."""
    return atomic_write(
        path, lambda f: img.save(f, format="PNG", compress_level=1, compress_type=zlib.Z_HUFFMAN_ONLY), durable=False
    )
