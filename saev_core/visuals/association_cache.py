"""The latent-class association's data (``Association``: AUROC per class and latent, the labels of each latent's top
images) and its files: ``cache/association.npz`` (the arrays, keyed by the top-k cache's identity) and
``association.json`` (the lists). Format: docs/visuals-format.md.

Imports neither torch nor scipy, so the explorer reads an association without them; computing one
(``association``) needs scipy's rank transform."""

import dataclasses
import os

import numpy as np
from jaxtyping import Float, Int

from saev_core.files import atomic_write_json
from saev_core.visuals.npz_cache import identity_mismatch, read_npz_with_meta, write_npz_with_meta
from saev_core.visuals.topk_cache import CacheIdentity

ASSOCIATION_VERSION = 1
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


def npz_path(dump_to: str) -> str:
    return os.path.join(dump_to, "cache", "association.npz")


def json_path(dump_to: str) -> str:
    return os.path.join(dump_to, "association.json")


def save(assoc: Association, identity: CacheIdentity, dump_to: str, alive: np.ndarray) -> None:
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


def load(dump_to: str, identity: CacheIdentity | None = None) -> Association | None:
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
