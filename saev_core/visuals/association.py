"""Latent-class association: which image classes (the store's labels) a latent fires on.

Two views per latent, both from the store's image labels (an image folder's first sub-folder):

- **label distribution of its top images**: the classes of the images in its top-k list (``top_images.TopKCache``);
- **AUROC per class over all images**: how well the image's ranking value for the latent (its best patch, or its
  CLS value in ``cls`` mode) separates that class from the others. 1: every image of the class ranks above every
  other image; 0.5: no better than chance (a dead latent); 0: the class ranks last. Ties (most images have value 0
  for a sparse latent) count one half, as in ``sklearn.metrics.roc_auc_score``.

The AUROC of every (class, latent) pair comes from one rank transform of the [images, latents] matrix (Mann-Whitney:
AUROC = (sum of the class's ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)), one matrix product for all classes.
The matrix is collected during the top-k pass (``topk_pass(on_batch=...)``) or by a pass of its own; above
``max_images`` images a seeded sample is kept. Format: docs/visuals-format.md (``cache/association.npz``,
``association.json``).
"""

import dataclasses
import os

import numpy as np
import scipy.stats
from jaxtyping import Float, Int

from saev_core.errors import UserError
from saev_core.files import atomic_write_json
from saev_core.store import ActivationStore
from saev_core.visuals import top_images
from saev_core.visuals.npz_cache import identity_mismatch, read_npz_with_meta, write_npz_with_meta

ASSOCIATION_VERSION = 1
MAX_MATRIX_BYTES = 1 << 28
"""The [images, latents] float32 matrix is kept under this many bytes (a seeded sample of images beyond: 4,096
images at d_sae 16,384, plenty for an AUROC)."""
RANK_COLUMNS = 1024
"""Latents ranked at a time (the float64 ranks of a block, not of the whole matrix, are in memory)."""
N_TOP = 10
"""Latents listed per class, classes listed per latent, in association.json."""


@dataclasses.dataclass
class Association:
    class_names: list[str]
    auroc: Float[np.ndarray, "n_classes d_sae"]
    """AUROC of the latent's image value for the class; NaN for a class without images (or with every image)."""
    top_label_counts: Int[np.ndarray, "d_sae n_classes"]
    """Classes of the images in each latent's top-k list."""
    n_images: Int[np.ndarray, " n_classes"]
    """Images of each class the AUROC counted."""

    def selectivity(self) -> Float[np.ndarray, " d_sae"]:
        """Each latent's best AUROC over the classes (how well it picks out one class)."""
        if self.auroc.size == 0:
            return np.full(self.auroc.shape[1], np.nan)
        with np.errstate(invalid="ignore"):
            return np.nanmax(np.where(np.isnan(self.auroc), -np.inf, self.auroc), axis=0)

    def top_latents(self, c: int, n: int = N_TOP) -> list[tuple[int, float]]:
        """The n latents with the highest AUROC for class c (ties: lower id first)."""
        order = np.lexsort((np.arange(self.auroc.shape[1]), -np.nan_to_num(self.auroc[c], nan=-1.0)))[:n]
        return [(int(j), float(self.auroc[c, j])) for j in order]

    def top_classes(self, latent: int, n: int = 3) -> list[tuple[str, float]]:
        """The n classes with the highest AUROC for a latent."""
        col = np.nan_to_num(self.auroc[:, latent], nan=-1.0)
        order = np.lexsort((np.arange(len(col)), -col))[:n]
        return [
            (self.class_names[c], float(self.auroc[c, latent])) for c in order if not np.isnan(self.auroc[c, latent])
        ]


def auroc_per_class(
    values: Float[np.ndarray, "imgs d_sae"], labels: Int[np.ndarray, " imgs"], n_classes: int
) -> Float[np.ndarray, "n_classes d_sae"]:
    """AUROC of every column of ``values`` for every class (one-vs-rest), ties counting one half."""
    onehot = np.zeros((len(labels), n_classes))
    onehot[np.arange(len(labels)), labels] = 1.0
    n_pos = onehot.sum(axis=0)
    n_neg = len(labels) - n_pos
    rank_sums = np.empty((n_classes, values.shape[1]))
    for start in range(0, values.shape[1], RANK_COLUMNS):
        block = slice(start, start + RANK_COLUMNS)
        rank_sums[:, block] = onehot.T @ scipy.stats.rankdata(values[:, block], axis=0)  # average ranks: ties shared
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = (rank_sums - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]
    auroc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auroc


def top_label_counts(cache: top_images.TopKCache, labels: np.ndarray, n_classes: int) -> np.ndarray:
    filled = cache.top_images >= 0
    latent_ids = np.broadcast_to(np.arange(cache.d_sae)[:, None], filled.shape)[filled]
    classes = labels[cache.top_images[filled]]
    counts = np.zeros((cache.d_sae, n_classes), dtype=np.int64)
    np.add.at(counts, (latent_ids, classes), 1)
    return counts


class ImageValues:
    """Collects each image's ranking value of every latent during a top-k pass (``topk_pass(on_batch=self)``),
    for a seeded sample of at most ``max_images`` of the store's valid images."""

    def __init__(self, store: ActivationStore, d_sae: int, seed: int = 0, max_bytes: int = MAX_MATRIX_BYTES):
        valid = np.flatnonzero(store.usable_images())
        max_images = max(1, max_bytes // (4 * d_sae))
        if len(valid) > max_images:
            valid = np.sort(np.random.default_rng(seed).choice(valid, max_images, replace=False))
        self.images = valid
        self.row = np.full(store.n_imgs, -1, dtype=np.int64)
        self.row[valid] = np.arange(len(valid))
        self.values = np.zeros((len(valid), d_sae), dtype=np.float32)

    def __call__(self, ids: np.ndarray, rank) -> None:
        rows = self.row[ids]
        keep = rows >= 0
        self.values[rows[keep]] = rank.float().cpu().numpy()[keep]


def compute(cache: top_images.TopKCache, values: ImageValues, store: ActivationStore) -> Association:
    labels = store.image_labels()
    names = store.class_names
    if (labels < 0).any() or (labels >= len(names)).any():
        raise UserError(f"The store {store.path} has labels outside its {len(names)} class names; record it again.")
    n = len(names)
    img_labels = labels[values.images]
    return Association(
        list(names),
        auroc_per_class(values.values, img_labels, n).astype(np.float32),
        top_label_counts(cache, labels, n),
        np.bincount(img_labels, minlength=n),
    )


def has_classes(store: ActivationStore) -> bool:
    """Whether the labels can say anything: at least two classes with images."""
    return len(np.unique(store.image_labels()[store.valid_images()])) >= 2


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def npz_path(dump_to: str) -> str:
    return os.path.join(dump_to, "cache", "association.npz")


def json_path(dump_to: str) -> str:
    return os.path.join(dump_to, "association.json")


def save(assoc: Association, identity: top_images.CacheIdentity, dump_to: str, alive: np.ndarray) -> None:
    """cache/association.npz (the arrays, with the top-k cache's identity) and association.json (the lists)."""
    meta = {**dataclasses.asdict(identity), "association_version": ASSOCIATION_VERSION}
    write_npz_with_meta(
        npz_path(dump_to),
        meta,
        {
            "class_names": np.array(assoc.class_names, dtype=str),
            "auroc": assoc.auroc,
            "top_label_counts": assoc.top_label_counts,
            "n_images": assoc.n_images,
        },
    )
    atomic_write_json(
        json_path(dump_to),
        {
            "class_names": assoc.class_names,
            "n_images": assoc.n_images.tolist(),
            "top_latents_per_class": {
                name: [{"latent": j, "auroc": round(a, 6)} for j, a in assoc.top_latents(c)]
                for c, name in enumerate(assoc.class_names)
                if assoc.n_images[c] > 0
            },
            "top_classes_per_latent": {
                str(j): [{"class": name, "auroc": round(a, 6)} for name, a in assoc.top_classes(int(j))]
                for j in np.flatnonzero(alive)
            },
        },
    )


def load(dump_to: str, identity: top_images.CacheIdentity | None = None) -> Association | None:
    """The association beside a visuals cache; None when absent, or made for other inputs than ``identity``."""

    def build(meta: dict, z: dict[str, np.ndarray]) -> tuple[dict, Association]:
        return meta, Association([str(n) for n in z["class_names"]], z["auroc"], z["top_label_counts"], z["n_images"])

    read = read_npz_with_meta(npz_path(dump_to), ("class_names", "auroc", "top_label_counts", "n_images"), build)
    if read is None:
        return None
    meta, assoc = read
    if meta.get("association_version") != ASSOCIATION_VERSION:
        return None
    if identity is not None and identity_mismatch(meta, identity):
        return None
    return assoc
