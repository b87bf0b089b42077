"""The embedded default image set: crops of the real photographs that scikit-image, scikit-learn and matplotlib ship
in their wheels (no download), generated once into a cache folder (see docs/embedded-images.md).

Generation writes into a temporary sibling folder and renames it into place only when complete; every file gets a
fixed mtime so the image-list fingerprint (and the store key) is the same on every machine.
"""

import math
import os
import shutil
import time
import uuid
import warnings
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from saev_core import config
from saev_core.errors import UserError
from saev_core.record.images import load_rgb, to_uint8

EMBEDDED_VERSION = "v1"
"""Bump when the photos or the cropping change, so old caches are not reused."""
MIN_EMBEDDED_IMAGES = 256
EMBEDDED_SIZE = 224
EMBEDDED_SEED = 20240601
EMBEDDED_MTIME_NS = 1_700_000_000 * 10**9
"""Every generated file gets this mtime, so the image-list fingerprint is the same on every machine."""
_STALE_TMP_S = 600


def _skimage(fn: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        out = getattr(skimage.data, fn)()
        return out[0] if fn == "stereo_motorcycle" else out  # (left, right, disparity): the left view

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib.cbook import get_sample_data

        return np.asarray(load_rgb(get_sample_data(name, asfileobj=False)))

    return load


EMBEDDED_PHOTOS: tuple[tuple[str, Callable[[], np.ndarray]], ...] = (
    # colour
    ("astronaut", _skimage("astronaut")),
    ("chelsea", _skimage("chelsea")),
    ("coffee", _skimage("coffee")),
    ("rocket", _skimage("rocket")),
    ("hubble_deep_field", _skimage("hubble_deep_field")),
    ("immunohistochemistry", _skimage("immunohistochemistry")),
    ("retina", _skimage("retina")),
    ("motorcycle", _skimage("stereo_motorcycle")),
    ("china", _sklearn("china.jpg")),
    ("flower", _sklearn("flower.jpg")),
    ("grace_hopper", _matplotlib("grace_hopper.jpg")),
    # grayscale
    ("camera", _skimage("camera")),
    ("moon", _skimage("moon")),
    ("coins", _skimage("coins")),
    ("page", _skimage("page")),
    ("text", _skimage("text")),
    ("brick", _skimage("brick")),
    ("grass", _skimage("grass")),
    ("gravel", _skimage("gravel")),
    ("cell", _skimage("cell")),
    ("clock", _skimage("clock")),
)
"""(folder name = class, loader) of every photograph; all ship inside the packages' wheels (no download)."""


def ensure_embedded_images(cfg: config.EmbeddedDataset) -> str:
    """The folder of the embedded default set, generated on first use; returns it.

    Generation writes into a temporary sibling folder and renames it into place only when complete, so a killed
    generation is never taken for a finished one.
    """
    if cfg.n_imgs_per_photo < 1:
        raise UserError(f"n_imgs_per_photo is {cfg.n_imgs_per_photo}; it must be at least 1.")
    base = os.path.abspath(os.path.expanduser(cfg.cache_dir or os.path.join(config.cache_dir(), "embedded")))
    n_per = max(cfg.n_imgs_per_photo, math.ceil(MIN_EMBEDDED_IMAGES / len(EMBEDDED_PHOTOS)))

    def fill(folder: str) -> None:
        photos = load_photos()
        # photos that failed to load are made up for by more crops of the others (the fingerprint shows it)
        per_photo = max(n_per, math.ceil(MIN_EMBEDDED_IMAGES / len(photos)))
        for name, photo in photos:
            _write_crops(photo, name, per_photo, os.path.join(folder, name))

    return generate_once(base, f"{EMBEDDED_VERSION}-n{n_per}", EMBEDDED_VERSION, fill)


def generate_once(base: str, name: str, version: str, fill: Callable[[str], None]) -> str:
    """<base>/<name>, made on first use by ``fill(folder)``; an existing one is returned at once (loading nothing).

    ``fill`` writes into a temporary sibling folder, renamed into place only when complete, so a killed generation
    is never taken for a finished one; temporary folders of generations killed long ago (``version``) are removed."""
    final = os.path.join(base, name)
    if os.path.isdir(final):  # the reuse path imports nothing: observable sources call it on every tick
        return final
    os.makedirs(base, exist_ok=True)
    remove_stale_tmp(base, version)
    tmp = os.path.join(base, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race with another process: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_photos(names: Sequence[str] | None = None) -> list[tuple[str, Image.Image]]:
    """(name, RGB photo) of the embedded photographs (all, or ``names`` in that order); those that fail to load are
    skipped with one warning, and UserError when none loads."""
    loaders = dict(EMBEDDED_PHOTOS)
    photos, failed = [], []
    for name, load in [(n, loaders[n]) for n in names] if names is not None else EMBEDDED_PHOTOS:
        try:
            arr = np.asarray(load())
            if arr.dtype != np.uint8:  # e.g. float images in [0, 1]
                arr = to_uint8(arr * 255 if arr.max() <= 1 else arr, "F")
            photos.append((name, Image.fromarray(arr).convert("RGB")))
        except Exception as err:
            failed.append(f"{name} ({type(err).__name__}: {err})")
    if failed:
        warnings.warn(f"embedded image set: skipped photos that failed to load: {'; '.join(failed)}", stacklevel=3)
    if not photos:
        raise UserError(
            "None of the embedded photographs could be loaded (scikit-image, scikit-learn, matplotlib): "
            f"{'; '.join(failed)}. Reinstall those packages or use an image folder (data:image-folder)."
        )
    return photos


def embedded_crop_boxes(width: int, height: int, n: int, name: str) -> list[tuple[tuple[int, int, int, int], bool]]:
    """(crop box, horizontal flip) for each of ``n`` crops of a photo: the centre square first, then squares of
    30-100 % of the short side at random places, from a RNG seeded by the photo's name (stable if others fail)."""
    rng = np.random.default_rng([EMBEDDED_SEED, zlib.crc32(name.encode())])
    short = min(width, height)
    out = []
    for j in range(n):
        side = short if j == 0 else max(1, round(short * rng.uniform(0.3, 1.0)))
        left = (width - side) // 2 if j == 0 else int(rng.integers(0, width - side + 1))
        top = (height - side) // 2 if j == 0 else int(rng.integers(0, height - side + 1))
        flip = j > 0 and bool(rng.random() < 0.5)
        out.append(((left, top, left + side, top + side), flip))
    return out


def _write_crops(photo: Image.Image, name: str, n: int, folder: str) -> None:
    os.makedirs(folder)
    width = max(3, len(str(n - 1)))
    for j, (box, flip) in enumerate(embedded_crop_boxes(photo.width, photo.height, n, name)):
        img = photo.crop(box).resize((EMBEDDED_SIZE, EMBEDDED_SIZE), Image.Resampling.LANCZOS)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = os.path.join(folder, f"{j:0{width}d}.png")
        img.save(path, format="PNG", compress_level=1)  # level 6 is 3x slower for 5 % smaller files
        os.utime(path, ns=(EMBEDDED_MTIME_NS, EMBEDDED_MTIME_NS))


def remove_stale_tmp(base: str, version: str) -> None:
    """Delete temporary folders left by killed generations (generation takes seconds; these are minutes old)."""
    now = time.time()
    for entry in os.scandir(base):
        if entry.name.startswith(f".{version}-") and ".tmp-" in entry.name:
            try:
                if now - entry.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass
