"""Patch probes: does one latent pick out the patches of a class? (Stevens et al., arXiv 2511.17735; docs/probes.md)

For every (latent, class) a 1-D logistic probe ``p = sigmoid(w * f_latent(patch) + b)`` is fitted on the training
split's labelled patches (label == class vs any other class); each class's **best latent** is the one of lowest
training loss. On the held-out split: **AP** of the best latent's probe scores, **mAP** over classes,
**Purity@k** (the share of its top-k held-out patches that belong to the class) and **Coverage@tau** (the share of
classes whose best latent reaches AP >= tau). A 1-D probe ranks like ``sign(w) * f``, so AP and Purity@k use the
latent's own values in the direction of ``w``. Unlabelled patches (label 0) are left out of training and evaluation
(ADE20K's convention: 0 is "not annotated", ignored by its benchmark).

**One pass, memory independent of the number of patches.** Each latent's values are cut into ``n_bins`` bins
(quantiles of its nonzero values on a calibration sample of training patches, finer in the top tail, plus a bin of
its own for exactly 0). The pass counts per (latent, bin, class) the training patches and sums their values, and
counts the held-out patches; it keeps each latent's exact top-k and bottom-k held-out patches (value and class) for
Purity@k. Probes are then fitted to the binned training data (each bin's positives at their mean value, its
negatives at theirs) by vectorised Newton steps; AP is computed from the held-out bins, so it is the exact AP of the
bin-quantised scores (ties within a bin count as ties). Memory: O(latents x bins x classes + latents x k), never
O(patches); the patch-label array of the store is read whole (one small int per patch).

The pass only touches nonzero latent values (the zero bin's counts are the class totals minus the rest), so a
sparse SAE costs little beyond its own forward. Controls (PCA directions, the random-decoder control, k-means) go
through the same pass as further "encoders" (``probe_run``).

This module holds the pass; the bins are in ``probe_bins``, the fit in ``probe_fit``, the metrics in
``probe_scores`` (their public names are importable from here too).
"""

from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Float, Integer
from torch import Tensor
from tqdm.auto import tqdm

from saev_core.analysis.probe_bins import N_BINS, BinAccumulator, BinnedData, bin_edges
from saev_core.analysis.probe_fit import ProbeFit, fit_probes
from saev_core.analysis.probe_scores import (
    TAU,
    TOP_K,
    ClassProbe,
    ProbeMetrics,
    average_precision,
    evaluate,
    purity_at_k,
)
from saev_core.errors import UserError
from saev_core.store import ActivationStore
from saev_core.store.shards import ChunkReader, stream_chunks
from saev_core.store.tokens import first_patch

__all__ = [
    "N_BINS",
    "NO_LABELS_FIX",
    "TAU",
    "TOP_K",
    "BinnedData",
    "ClassProbe",
    "Encode",
    "ProbeFit",
    "ProbeMetrics",
    "average_precision",
    "bin_edges",
    "check_labels",
    "evaluate",
    "fit_probes",
    "labelled_patches",
    "probe_pass",
    "purity_at_k",
]

NO_LABELS_FIX = (
    "record the images with per-patch labels: `activations ... data:seg-folder-dataset --data.root DIR` (ADE20K "
    "layout), or the embedded segmentation set"
)

Encode = Callable[[Float[Tensor, "n d_vit"]], Float[Tensor, "n width"]]
"""Raw activations in, one value per "latent" out (an SAE's encode, or a control's)."""


def labelled_patches(
    store: ActivationStore, layer: int, labels: Integer[np.ndarray, "n_imgs n_patches"], images: np.ndarray
):
    """Yield (image ids, vectors [n, d_vit] float32, classes [n] in 0..C-1) of the labelled patches of ``images``,
    a chunk at a time in store order."""
    first, ipc = first_patch(store), store.layout.imgs_per_chunk
    images = np.sort(np.asarray(images, dtype=np.int64))
    chunks, starts = np.unique(images // ipc, return_index=True)
    reader = ChunkReader(store.array(layer))
    for c, imgs, x in stream_chunks(reader, chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
        lab = labels[imgs]
        keep = lab > 0
        yield imgs, x[imgs - c * ipc, first:][keep].astype(np.float32, copy=False), lab[keep].astype(np.int64) - 1


def check_labels(store: ActivationStore, labels: np.ndarray | None, class_names: list[str]) -> None:
    """One line for a store without usable patch labels."""
    if labels is None:
        raise UserError(f"The store {store.path} has no per-patch labels, which patch probes need; {NO_LABELS_FIX}.")
    n_patches = store.n_tokens - first_patch(store)
    if labels.shape != (store.n_imgs, n_patches):
        raise UserError(
            f"The store {store.path}'s patch labels have shape {labels.shape}, not (n_imgs, n_patches) = "
            f"{(store.n_imgs, n_patches)}; record the store again."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise UserError(
            f"The store {store.path}'s patch labels run {labels.min()}..{labels.max()} but it names "
            f"{len(class_names)} classes (0 = unlabelled); record the store again."
        )


@torch.inference_mode()
def probe_pass(
    store: ActivationStore,
    layer: int,
    labels: Integer[np.ndarray, "n_imgs n_patches"],
    n_classes: int,
    train: np.ndarray,
    val: np.ndarray,
    encoders: dict[str, tuple[Encode, Float[Tensor, "width edges"]]],
    k: int = TOP_K,
    device: str = "cpu",
    batch_vectors: int = 4096,
    show_progress: bool = False,
) -> dict[str, BinnedData]:
    """One pass over the labelled patches of ``train`` and ``val`` images; each encoder (name -> (encode, its bin
    edges)) sees every batch. Returns each encoder's binned data."""
    acc = {name: BinAccumulator(edges.to(device), n_classes, k) for name, (_, edges) in encoders.items()}
    is_val = np.zeros(store.n_imgs, dtype=bool)
    is_val[val] = True
    n_total = int((labels[np.r_[train, val]] > 0).sum())
    pending: dict[str, list] = {"train": [], "val": []}

    def flush(split: str) -> None:
        if not pending[split]:
            return
        x = torch.from_numpy(np.concatenate([p[0] for p in pending[split]])).to(device)
        classes = torch.from_numpy(np.concatenate([p[1] for p in pending[split]])).to(device)
        pending[split].clear()
        for start in range(0, len(x), batch_vectors):
            xb, cb = x[start : start + batch_vectors], classes[start : start + batch_vectors]
            for name, (encode, _) in encoders.items():
                acc[name].add(encode(xb), cb, split)
            bar.update(len(xb))

    with tqdm(total=n_total, unit="patch", unit_scale=True, desc="probes", disable=not show_progress) as bar:
        for imgs, x, classes in labelled_patches(store, layer, labels, np.r_[train, val]):
            per_img = (labels[imgs] > 0).sum(axis=1)
            owner = np.repeat(is_val[imgs], per_img)
            for split, mask in (("train", ~owner), ("val", owner)):
                if mask.any():
                    pending[split].append((x[mask], classes[mask]))
                    if sum(len(p[0]) for p in pending[split]) >= batch_vectors:
                        flush(split)
        flush("train")
        flush("val")
    return {name: a.result() for name, a in acc.items()}
