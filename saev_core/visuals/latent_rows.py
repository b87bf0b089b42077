"""The gallery's row of each rendered latent, and its ``neurons/<latent>/metadata.json``: its numbers, its shown
images with their labels, sizes and originals, its value histogram, the class outlined on its heatmaps, its patch
probes and (``add_classes``) its best classes."""

import dataclasses
import math

import numpy as np
from jaxtyping import Float

from saev_core.files import atomic_write_json, inside
from saev_core.store import ActivationStore
from saev_core.visuals import heatmaps, patch_classes
from saev_core.visuals.gallery_layout import NEURONS_DIR, image_relpath, original_relpath
from saev_core.visuals.topk_cache import HIST_EDGES, TopKCache


@dataclasses.dataclass
class LatentRows:
    """What every gallery row reads: the cache, the store's image index and patch labels, the rendered pictures'
    sizes and crop boxes, and the probe."""

    cache: TopKCache
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
            inside(self.dump_to, NEURONS_DIR, str(latent), "metadata.json", what="latent id"),
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
                "cls_values": [finite_or_none(v) for v in cache.top_cls[latent, :n]],
                "originals": [original_relpath(i) for i in imgs],
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
            "images": [image_relpath(latent, rank) for rank in range(n)],
            "labels": names,
            "originals": [original_relpath(i) for i in imgs],
            "sizes": sizes,
            "hist_counts": cache.hist[latent],
            "hist_edges": HIST_EDGES,
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


def finite_or_none(x: Float[np.floating, ""] | float) -> float | None:
    return float(x) if np.isfinite(x) else None
