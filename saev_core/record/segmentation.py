"""Segmentation image sources: images with class-index masks, and the per-patch labels the store keeps.

Layout (ADE20K's): ``ROOT/images/<rel>.<ext>`` and ``ROOT/annotations/<rel>.png`` (same relative folder, same stem),
an 8-bit class-index PNG (mode L or P) the size of its image, 0 = unlabelled; an optional ``ROOT/classes.txt`` names
classes 1..C, one per line (without it the classes are 1..255, named by number).

Decisions:
- **Geometry.** The mask goes through the ViT's own eval transform steps (its resize and centre crop, the same
  objects) with the interpolation switched to nearest-neighbour and padding filled with 0 (unlabelled), so each
  patch sees the mask pixels under the ViT's view of the image, rounded as the library rounds.
- **Majority rule** (``patch_majority``), per patch of the grid: the patch is unlabelled (0) when strictly more than
  half of its pixels are 0; otherwise it takes the most frequent non-zero class among its pixels, ties going to the
  lowest class index. So a patch half sky, half unlabelled is sky; one 40 % sky, 60 % unlabelled is unlabelled.
- **Bad masks** (missing, undecodable, not 8-bit, a size other than the image's, a class above C when classes.txt
  exists) stop the recording with one line naming the file, or with ``--data.skip-bad`` make the image invalid (zero
  activations, ``valid = 0``, label row 0) with a warning. Missing masks are found when listing, before any store
  exists; the others when the mask is read (in the data-loading workers, where nothing raises: they hand back a row
  of ``BAD_MASK``, and the main process asks ``mask_error`` why).

Imports no torch: the transform steps are the ViT's own objects, called on PIL images.
"""

import copy
import enum
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from jaxtyping import Int, UInt8
from PIL import Image

from saev_core import config
from saev_core.errors import UserError
from saev_core.record.images import IgnoredFilesWarning, ImageSource, hash_file_stats, list_source, load_rgb

IMAGES_DIR = "images"
MASKS_DIR = "annotations"
CLASSES_FILE = "classes.txt"
UNLABELLED = "unlabelled"
LABEL_RULE = "majority-v1"
"""Names the majority rule in the fingerprint; bump it when the rule changes, so old stores are not reused."""
MAX_CLASSES = 255
"""Masks are 8-bit: classes 1..255."""
BAD_MASK = -1
"""Patch-label row value handed back by a worker for an image whose mask is bad."""

NON_GEOMETRIC_STEPS = frozenset(
    {
        "ToTensor",
        "PILToTensor",
        "MaybeToTensor",
        "MaybePILToTensor",
        "ToNumpy",
        "Normalize",
        "ConvertImageDtype",
        "ToDtype",
        "ToImage",
        "ToPureTensor",
        "MaybeConvertMode",
        "_convert_to_rgb",
        "Grayscale",
    }
)
"""Transform steps (class or function names) that do not move pixels (shared with ``visuals.heatmaps``)."""


class MaskError(Exception):
    """A mask that cannot give patch labels; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------------------------
# Masks to patch labels
# ----------------------------------------------------------------------------------------------------------------


def mask_transform(transform) -> "MaskSteps":
    """The geometric steps of a ViT eval transform (a ``Compose``, a list, or one step), made safe for class-index
    masks: resizes with nearest-neighbour, crops padding with 0. UserError names a step it cannot map."""
    steps = getattr(transform, "transforms", transform)
    if not isinstance(steps, (list, tuple)):
        steps = [steps]
    kept = []
    for step in steps:
        name = getattr(step, "__name__", None) or type(step).__name__
        if name in NON_GEOMETRIC_STEPS:
            continue
        if name in ("Resize", "ResizeKeepRatio"):
            step = copy.copy(step)
            step.interpolation = _nearest(step.interpolation)
        elif name == "CenterCropOrPad":
            step = copy.copy(step)
            step.fill = 0
        elif name != "CenterCrop":  # torchvision's CenterCrop pads with 0
            raise UserError(
                f"Cannot apply the ViT's transform step {step!r} to segmentation masks (supported: Resize, "
                "ResizeKeepRatio, CenterCrop, CenterCropOrPad); record this ViT from an image source without masks."
            )
        kept.append(step)
    return MaskSteps(kept)


class MaskSteps:
    """The mask's geometric steps, in order (a class, not a closure, so a source holding it pickles to workers)."""

    def __init__(self, steps: list):
        self.steps = steps

    def __call__(self, mask: Image.Image) -> Image.Image:
        for step in self.steps:
            mask = step(mask)
        return mask


def _nearest(interpolation: Any) -> Any:
    """Nearest-neighbour in the interpolation's own type (torchvision's enum, or a name)."""
    if isinstance(interpolation, enum.Enum):
        return type(interpolation)("nearest")
    return "nearest"


def patch_grid(n_patches_per_img: int) -> tuple[int, int]:
    """(rows, cols) of a square patch grid."""
    side = math.isqrt(n_patches_per_img)
    if side * side != n_patches_per_img:
        raise UserError(
            f"Patch labels need a square patch grid, but the ViT has {n_patches_per_img} patches per image. "
            "Record from an image source without masks, or pass --n-patches-per-img for a square grid."
        )
    return side, side


def patch_majority(mask: UInt8[np.ndarray, "height width"], grid: tuple[int, int]) -> UInt8[np.ndarray, " n_patches"]:
    """Each patch's label under the majority rule (module docstring), row-major over ``grid = (rows, cols)``.
    The mask must tile the grid exactly (the ViT's input size is a multiple of its patch size)."""
    rows, cols = grid
    height, width = mask.shape
    if height % rows or width % cols:
        raise ValueError(f"a {width}x{height} mask does not tile a {rows}x{cols} patch grid")
    cell = (np.arange(height) // (height // rows))[:, None] * cols + (np.arange(width) // (width // cols))[None, :]
    counts = np.bincount((cell * 256 + mask).ravel(), minlength=rows * cols * 256).reshape(rows * cols, 256)
    labels = np.argmax(counts[:, 1:], axis=1) + 1  # argmax takes the first of equal counts: the lowest class
    unlabelled = 2 * counts[:, 0] > (height // rows) * (width // cols)
    return np.where(unlabelled, 0, labels).astype(np.uint8)


def check_grid(transform, grid: tuple[int, int]) -> None:
    """UserError when the ViT's input does not tile its patch grid (then no patch has a whole set of pixels)."""
    width, height = mask_transform(transform)(Image.new("L", (97, 61))).size
    if height % grid[0] or width % grid[1]:
        raise UserError(
            f"The ViT's input is {width}x{height} pixels, which does not split into its {grid[0]}x{grid[1]} patch "
            "grid, so masks cannot be mapped to patches. Check --n-patches-per-img."
        )


# ----------------------------------------------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------------------------------------------


class SegImageSource(ImageSource):
    """An ``ImageSource`` over ``ROOT/images`` whose images have masks in ``ROOT/annotations``.

    ``patch_class_names``: "unlabelled" then classes 1..C. ``with_patch_labels(grid)`` is the dataset recording
    reads: ``(pixels, index, label, patch_labels)``, the labels computed in the loading workers."""

    def __init__(
        self,
        base: ImageSource,
        mask_root: str,
        patch_class_names: list[str],
        classes_file: str | None,
        skip_bad: bool,
    ):
        super().__init__(base.root, base.paths, base.labels, base.class_names, base.transform)
        self.mask_root = mask_root
        self.mask_paths = [os.path.splitext(p)[0] + ".png" for p in self.paths]
        """POSIX paths relative to ``mask_root``, one per image."""
        self.patch_class_names = patch_class_names
        self.classes_file = classes_file
        self.skip_bad = skip_bad

    def __repr__(self) -> str:
        return (
            f"SegImageSource(root={self.root!r}, n_imgs={len(self)}, n_patch_classes={len(self.patch_class_names) - 1})"
        )

    def mask_abspath(self, i: int) -> str:
        return os.path.join(self.mask_root, *self.mask_paths[self._check_index(i)].split("/"))

    def read_mask(self, i: int, image_size: tuple[int, int]) -> UInt8[np.ndarray, "height width"]:
        """Mask ``i`` as class indices, checked against its image's (width, height); MaskError says what is wrong."""
        path = self.mask_abspath(i)
        if not os.path.isfile(path):
            raise MaskError(f"The mask {path} of image {self.abspath(i)} is missing")
        try:
            with Image.open(path) as img:
                img.load()
                mode, size = img.mode, img.size
                mask = np.asarray(img) if mode in ("L", "P") else None
        except Exception as err:
            raise MaskError(f"The mask {path} cannot be decoded ({type(err).__name__}: {err})") from None
        if mask is None:
            raise MaskError(f"The mask {path} has mode {mode}; it must be an 8-bit class-index PNG (mode L or P)")
        if size != tuple(image_size):
            raise MaskError(
                f"The mask {path} is {size[0]}x{size[1]} but its image {self.abspath(i)} is "
                f"{image_size[0]}x{image_size[1]}; a mask must match its image pixel for pixel"
            )
        n_classes = len(self.patch_class_names) - 1
        top = int(mask.max(initial=0))
        if top > n_classes:
            raise MaskError(
                f"The mask {path} has class {top}, but {self.classes_file} names only {n_classes} classes "
                f"(1..{n_classes})"
            )
        return mask

    def patch_labels_of(self, i: int, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        """uint8 [rows * cols]: the patch labels of image ``i`` (whose upright size is ``image_size``)."""
        mask = self.read_mask(i, image_size)
        viewed = self._mask_view(Image.fromarray(mask))
        return patch_majority(np.asarray(viewed), grid)

    def mask_error(self, i: int) -> str:
        """Why image ``i``'s mask gives no labels (one line); ``""`` when it does now."""
        try:
            size = load_rgb(self.abspath(i)).size
        except Exception:
            return ""  # the image itself is bad: decode_error says so
        try:
            self.read_mask(i, size)
        except MaskError as err:
            return str(err)
        return ""

    def patch_labels_fingerprint(self) -> str:
        """Hex SHA-256 over the labelling rule, the class names, and every mask's (relative path, size, mtime_ns)
        in index order: part of the store key, so other masks or classes make another store."""
        h = hashlib.sha256(f"saev-patch-labels-{LABEL_RULE}\n".encode())
        h.update(json.dumps(self.patch_class_names).encode() + b"\n")
        hash_file_stats(h, self.mask_paths, self.mask_abspath)
        return h.hexdigest()

    def with_patch_labels(self, grid: tuple[int, int]) -> "PatchLabelledImages":
        return PatchLabelledImages(self, grid)

    def _mask_view(self, mask: Image.Image) -> Image.Image:
        if self.transform is None:
            return mask
        if "_mask_steps" not in self.__dict__:
            self._mask_steps = mask_transform(self.transform)
        return self._mask_steps(mask)


class PatchLabelledImages:
    """Map-style dataset ``i -> (pixels, i, label, patch_labels)`` over a ``SegImageSource``; ``patch_labels`` is
    int16 [rows * cols], all ``BAD_MASK`` when the mask is bad, all 0 when the image itself is bad. Never raises
    for a bad file (DataLoader worker tracebacks are unreadable)."""

    def __init__(self, source: SegImageSource, grid: tuple[int, int]):
        self.source, self.grid = source, grid
        self.n_patches = grid[0] * grid[1]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[Any, int, int, Int[np.ndarray, " n_patches"]]:
        source = self.source
        i = source._check_index(i)
        try:
            img = load_rgb(source.abspath(i))
        except Exception:
            pixels, _, label = source[i]  # the stand-in pixels of a bad image
            return pixels, i, label, np.zeros(self.n_patches, np.int16)
        try:
            labels = source.patch_labels_of(i, img.size, self.grid).astype(np.int16)
        except MaskError:
            labels = np.full(self.n_patches, BAD_MASK, np.int16)
        return source._pixels(img), i, source.labels[i], labels


def read_classes_file(root: str) -> tuple[list[str], str | None]:
    """("unlabelled", classes 1..C) from ROOT/classes.txt, and its path; without one, 1..255 named by number."""
    path = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(path):
        return [UNLABELLED, *map(str, range(1, MAX_CLASSES + 1))], None
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"Cannot read {path} ({type(err).__name__}: {err}); it must be UTF-8 text.") from None
    while lines and not lines[-1]:
        lines.pop()
    empty = [n + 1 for n, line in enumerate(lines) if not line]
    if not lines or empty:
        where = f"line {empty[0]} is empty" if empty else "it names no class"
        raise UserError(f"{path}: {where}. It names classes 1..C, one per line (class 0 is always unlabelled).")
    if len(lines) > MAX_CLASSES:
        raise UserError(f"{path} names {len(lines)} classes, but 8-bit masks hold at most {MAX_CLASSES} (1..255).")
    return [UNLABELLED, *lines], path


def make_seg_source(
    cfg: config.SegFolderDataset | config.EmbeddedSegDataset,
    transform: Callable[[Image.Image], Any] | None = None,
    n_imgs: int | None = None,
) -> SegImageSource:
    """List ``ROOT/images`` (embedded: generate the set first) and pair every image with its mask."""
    if isinstance(cfg, config.EmbeddedSegDataset):
        from saev_core.record.embedded_seg import ensure_embedded_seg_images  # builds on this module

        root, skip_bad = ensure_embedded_seg_images(cfg), False
    else:
        root, skip_bad = cfg.root, cfg.skip_bad
    root = os.path.abspath(os.path.expanduser(root))
    image_dir, mask_dir = os.path.join(root, IMAGES_DIR), os.path.join(root, MASKS_DIR)
    missing_dirs = [d for d in (image_dir, mask_dir) if not os.path.isdir(d)]
    if missing_dirs:
        raise UserError(
            f"{root} has no {' and no '.join(os.path.basename(d) + '/' for d in missing_dirs)} folder: "
            "data:seg-folder-dataset reads ADE20K's layout (ROOT/images/<name>.jpg, ROOT/annotations/<name>.png, "
            "optional ROOT/classes.txt). Point --data.root at such a folder."
        )
    patch_class_names, classes_file = read_classes_file(root)
    base = list_source(image_dir, skip_bad, transform, n_imgs)
    source = SegImageSource(base, mask_dir, patch_class_names, classes_file, skip_bad)
    _check_masks_exist(source)
    return source


def _check_masks_exist(source: SegImageSource) -> None:
    """Missing masks, found by listing before anything is recorded: an error, or with skip_bad a warning (those
    images are then recorded as invalid)."""
    missing = [i for i in range(len(source)) if not os.path.isfile(source.mask_abspath(i))]
    if not missing:
        return
    first = source.mask_abspath(missing[0])
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    if not source.skip_bad:
        raise UserError(
            f"The mask {first} of image {source.abspath(missing[0])} is missing{more}: every image under "
            f"images/ needs annotations/<same path and stem>.png. Add the masks, or pass --data.skip-bad to record "
            "those images as invalid."
        )
    warnings.warn(
        f"{len(missing)} image(s) have no mask, e.g. {first}; they are recorded as invalid (--data.skip-bad).",
        IgnoredFilesWarning,
        stacklevel=3,
    )
