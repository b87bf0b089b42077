"""Latent-class association: which image classes (the store's labels) a latent fires on.

Two views per latent, both from the store's image labels (an image folder's first sub-folder):

- **label distribution of its top images**: the classes of the images in its top-k list (``TopKCache``);
- **AUROC per class over all images**: how well the image's ranking value for the latent (its best patch, or its
  CLS value in ``cls`` mode) separates that class from the others. 1: every image of the class ranks above every
  other image; 0.5: no better than chance (a dead latent); 0: the class ranks last. Ties (most images have value 0
  for a sparse latent) count one half, as in ``sklearn.metrics.roc_auc_score``.

The AUROC of every (class, latent) pair comes from one rank transform of the [images, latents] matrix (Mann-Whitney:
AUROC = (sum of the class's ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)), one matrix product for all classes.
The matrix is collected during the top-k pass (``topk_pass(on_batch=...)``) or by a pass of its own; above
``max_images`` images a seeded sample is kept. Format: docs/visuals-format.md (``cache/association.npz``,
``association.json``: written and read by ``association_cache``, which imports no scipy).
"""

import numpy as np
import scipy.stats
from jaxtyping import Float, Int

from saev_core.errors import UserError
from saev_core.store import ActivationStore
from saev_core.visuals.association_cache import Association
from saev_core.visuals.topk_cache import TopKCache

MAX_MATRIX_BYTES = 1 << 28
"""The [images, latents] float32 matrix is kept under this many bytes (a seeded sample of images beyond: 4,096
images at d_sae 16,384, plenty for an AUROC)."""
RANK_COLUMNS = 1024
"""Latents ranked at a time (the float64 ranks of a block, not of the whole matrix, are in memory)."""


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


def top_label_counts(cache: TopKCache, labels: np.ndarray, n_classes: int) -> np.ndarray:
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


def compute(cache: TopKCache, values: ImageValues, store: ActivationStore) -> Association:
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
