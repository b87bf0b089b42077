"""The embedded segmentation set: composites with exact masks, made from the embedded photographs (no download),
generated once into a cache folder in the layout of ``data:seg-folder-dataset`` (see docs/embedded-images.md).

Each composite is a crop of a background photograph with one to three textures pasted on it, each cut from one of
the texture photographs (the classes) as a rectangle or an ellipse. The mask is written from the same boolean
regions that choose the pasted pixels, so it is exact: a pixel has class k exactly when it came from texture k.
Everything is drawn from a NumPy RNG seeded by a fixed seed and the composite's index; files get a fixed mtime, so
the image-list fingerprint (and the store key) is the same on every machine. Generation writes into a temporary
sibling folder and renames it into place only when complete.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from saev_core import config
from saev_core.errors import UserError
from saev_core.record.embedded import EMBEDDED_MTIME_NS, generate_once, load_photos
from saev_core.record.segmentation import CLASSES_FILE, IMAGES_DIR, MASKS_DIR

EMBEDDED_SEG_VERSION = "v1"
"""Bump when the photos, the classes or the compositing change, so old caches are not reused."""
EMBEDDED_SEG_SIZE = 224
EMBEDDED_SEG_SEED = 20251202

SEG_CLASSES: tuple[tuple[str, str], ...] = (
    ("brick", "brick"),
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("coins", "coins"),
    ("tissue", "immunohistochemistry"),
    ("stars", "hubble_deep_field"),
)
"""(class name, photograph) of classes 1..6: textures that look like nothing else in the set."""
SEG_BACKGROUNDS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "retina",
    "motorcycle",
    "china",
    "flower",
    "grace_hopper",
    "camera",
    "moon",
    "page",
    "text",
    "cell",
    "clock",
)
"""Photographs the textures are pasted on (unlabelled, class 0)."""


@dataclasses.dataclass(frozen=True)
class Paste:
    """One texture on a composite: class ``k`` (1-based), the region's box in the composite, its shape, and the
    square of the class photograph it is cut from (as fractions of the photo: left, top, side of the short side)."""

    k: int
    left: int
    top: int
    width: int
    height: int
    ellipse: bool
    crop: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Composite:
    """A background crop (photo index, fractions as in ``Paste.crop``, flip) and its pastes, bottom to top."""

    background: int
    crop: tuple[float, float, float]
    flip: bool
    pastes: tuple[Paste, ...]


def composite_plan(i: int) -> Composite:
    """The plan of composite ``i``, from an RNG seeded by the fixed seed and ``i`` alone."""
    rng = np.random.default_rng([EMBEDDED_SEG_SEED, i])
    size = EMBEDDED_SEG_SIZE
    background = int(rng.integers(len(SEG_BACKGROUNDS)))
    crop = _crop_fractions(rng, 0.5, 1.0)
    flip = bool(rng.random() < 0.5)
    n_pastes = int(rng.integers(1, 4))
    classes = rng.choice(len(SEG_CLASSES), size=n_pastes, replace=False) + 1
    pastes = []
    for k in classes.tolist():
        width, height = (int(v) for v in rng.integers(size // 4, size * 3 // 4, endpoint=True, size=2))
        left, top = int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1))
        pastes.append(Paste(k, left, top, width, height, bool(rng.random() < 0.5), _crop_fractions(rng, 0.3, 0.7)))
    return Composite(background, crop, flip, tuple(pastes))


def _crop_fractions(rng: np.random.Generator, low: float, high: float) -> tuple[float, float, float]:
    return float(rng.random()), float(rng.random()), float(rng.uniform(low, high))


def square_crop(photo: Image.Image, fractions: tuple[float, float, float], width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: a square of ``fractions[2]`` of the photo's short side at the fractional position
    ``fractions[:2]`` of the room left, resized (Lanczos) to width x height."""
    fx, fy, side_frac = fractions
    side = max(1, round(min(photo.size) * side_frac))
    left, top = round(fx * (photo.width - side)), round(fy * (photo.height - side))
    region = photo.crop((left, top, left + side, top + side)).resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(region)


def region_of(paste: Paste) -> np.ndarray:
    """bool [height, width]: the pixels of the paste's box it covers (a rectangle: all; an ellipse: those whose
    centre lies inside the inscribed ellipse)."""
    if not paste.ellipse:
        return np.ones((paste.height, paste.width), dtype=bool)
    y = (np.arange(paste.height) + 0.5 - paste.height / 2) / (paste.height / 2)
    x = (np.arange(paste.width) + 0.5 - paste.width / 2) / (paste.width / 2)
    return y[:, None] ** 2 + x[None, :] ** 2 <= 1.0


def render(
    plan: Composite, backgrounds: list[Image.Image], textures: list[Image.Image]
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [size, size, 3] image, uint8 [size, size] mask) of a plan; ``textures[k - 1]`` is class k's photo."""
    size = EMBEDDED_SEG_SIZE
    img = square_crop(backgrounds[plan.background], plan.crop, size, size).copy()
    if plan.flip:
        img = img[:, ::-1].copy()
    mask = np.zeros((size, size), dtype=np.uint8)
    for p in plan.pastes:
        texture = square_crop(textures[p.k - 1], p.crop, p.width, p.height)
        region = region_of(p)
        box = (slice(p.top, p.top + p.height), slice(p.left, p.left + p.width))
        img[box][region] = texture[region]
        mask[box][region] = p.k
    return img, mask


def image_class(mask: np.ndarray) -> int:
    """The class covering the most pixels (ties: the lower class), the composite's image-level class."""
    return int(np.argmax(np.bincount(mask.ravel(), minlength=len(SEG_CLASSES) + 1)[1:])) + 1


def ensure_embedded_seg_images(cfg: config.EmbeddedSegDataset) -> str:
    """The folder of the embedded segmentation set (images/, annotations/, classes.txt), generated on first use."""
    if cfg.n_imgs < 1:
        raise UserError(f"--data.n-imgs {cfg.n_imgs} must be at least 1.")
    base = os.path.abspath(os.path.expanduser(cfg.cache_dir or os.path.join(config.cache_dir(), "embedded-seg")))
    name = f"{EMBEDDED_SEG_VERSION}-n{cfg.n_imgs}"
    return generate_once(base, name, EMBEDDED_SEG_VERSION, lambda folder: _generate(folder, cfg.n_imgs))


def _generate(folder: str, n_imgs: int) -> None:
    names = [photo for _, photo in SEG_CLASSES] + list(SEG_BACKGROUNDS)
    loaded = dict(load_photos(names))
    missing = [n for n in names if n not in loaded]
    if missing:  # a missing class or background would change every composite: no silent stand-in
        raise UserError(
            f"The embedded segmentation set needs the photographs {missing}, which failed to load (see the warning). "
            "Reinstall scikit-image, scikit-learn and matplotlib, or use data:seg-folder-dataset."
        )
    textures = [loaded[photo] for _, photo in SEG_CLASSES]
    backgrounds = [loaded[n] for n in SEG_BACKGROUNDS]
    width = max(3, len(str(n_imgs - 1)))
    for i in range(n_imgs):
        img, mask = render(composite_plan(i), backgrounds, textures)
        rel = f"{SEG_CLASSES[image_class(mask) - 1][0]}/{i:0{width}d}.png"
        _save(Image.fromarray(img), os.path.join(folder, IMAGES_DIR, rel))
        _save(Image.fromarray(mask), os.path.join(folder, MASKS_DIR, rel))
    path = os.path.join(folder, CLASSES_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name, _ in SEG_CLASSES))
    os.utime(path, ns=(EMBEDDED_MTIME_NS, EMBEDDED_MTIME_NS))


def _save(img: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format="PNG", compress_level=1)
    os.utime(path, ns=(EMBEDDED_MTIME_NS, EMBEDDED_MTIME_NS))
