"""The top-k pass: one streaming pass of SAE inference over a store layer, and its cache.

For every latent it keeps the k images that fire it most, ranked by their best patch (token mode ``patches``) or by
their CLS token (``cls``), each with its full row of patch values for the heatmap and its CLS value (NaN without a
CLS token); and over every vector of the token mode, the firing frequency (f > 0), the mean value when firing and a
histogram of log10 values. Images are read whole chunks at a time in store order (``shards.stream_chunks``) and
encoded in batches sized by memory; every valid image counts, the last partial batch too.

Memory: the running top-k is O(d_sae * k * n_patches_per_img) plus one batch, never O(n_imgs). Each image enters
a latent's list at most once (by its best patch), so a latent fired by at least k images has exactly k distinct
images. Ties go to the lower image index (stable sorts): the result is deterministic.

The cache (``<dump_to>/cache/topk.npz``, one file written atomically, so a killed pass leaves none or an old one)
holds these arrays plus what made them: the SAE file's content hash, the store key, the layer, the token mode and k.
Its reader and writer live in ``topk_cache`` (no torch there, for the explorer).
Format: docs/visuals-format.md.
"""

import math
import os

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saev_core import config, threads
from saev_core.errors import UserError
from saev_core.store import ActivationStore
from saev_core.store.shards import ChunkReader, stream_chunks
from saev_core.store.tokens import first_patch
from saev_core.visuals.topk_cache import HIST_EDGES, CacheIdentity, TopKCache

RANK_MODES = ("patches", "cls")


# ----------------------------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------------------------


class _RunningTopK:
    """Per latent, k slots holding the best (value, image, patch row, CLS value) seen so far, in no order (``result``
    sorts them): a batch moves only the rows it replaces, not all d_sae * k of them.

    Entries are compared by one int64 key per (latent, image): the float32 bits of a positive value (which order as
    the values do) above 32 bits that rank a lower image index higher. Keys are unique, so ``topk`` needs no stable
    sort to break ties, and ties go to the lower image index."""

    def __init__(self, d_sae: int, k: int, n_patches: int, device: str):
        self.k = k
        self.keys = torch.full((d_sae, k), -1, dtype=torch.int64, device=device)  # -1: empty
        self.values = torch.zeros((d_sae, k), device=device)
        self.images = torch.full((d_sae, k), -1, dtype=torch.int64, device=device)
        self.rows = torch.zeros((d_sae, k, n_patches), device=device)
        self.cls = torch.full((d_sae, k), math.nan, device=device)

    def update(
        self,
        rank: Float[Tensor, "imgs d_sae"],
        patch_f: Float[Tensor, "imgs n_patches d_sae"],
        cls_f: Float[Tensor, "imgs d_sae"] | None,
        images: Int[Tensor, " imgs"],
    ) -> None:
        """Merge a batch of images (any order; an image never comes twice)."""
        keys = rank_keys(rank.T, images[None, :])  # an image that does not fire a latent never enters
        # Only keys above a latent's worst slot can enter (empty slots hold -1): late in a long stream few do, so
        # the merge below works on that many candidates per latent, not on the whole batch.
        n_cand = min(self.k, int((keys > self.keys.min(dim=1, keepdim=True).values).sum(dim=1).max()))
        if n_cand == 0:
            return
        if n_cand < keys.shape[1]:
            cand_keys, cand_pos = keys.topk(n_cand, dim=1)
        else:  # every image of the batch is a candidate
            cand_keys, cand_pos = keys, torch.arange(keys.shape[1], device=keys.device).expand_as(keys)
        merged = torch.cat([self.keys, cand_keys], dim=1)
        kept = torch.zeros_like(merged, dtype=torch.bool).scatter_(1, merged.topk(self.k, dim=1).indices, True)
        kept &= merged >= 0
        # Evicted slots and kept candidates pair up latent by latent (row-major order lists both by latent).
        incoming = kept[:, self.k :]
        lat_out, slot = _first_per_row(*(~kept[:, : self.k]).nonzero(as_tuple=True), incoming.sum(1))
        lat_in, cand = incoming.nonzero(as_tuple=True)
        img_pos = cand_pos[lat_in, cand]
        self.keys[lat_out, slot] = cand_keys[lat_in, cand]
        self.values[lat_out, slot] = rank[img_pos, lat_in]
        self.images[lat_out, slot] = images[img_pos]
        self.rows[lat_out, slot] = patch_f[img_pos, :, lat_in]
        if cls_f is not None:
            self.cls[lat_out, slot] = cls_f[img_pos, lat_in]

    def result(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(values, images, rows, cls), each latent's slots sorted best first (empty slots last)."""
        order = self.keys.argsort(dim=1, descending=True)
        rows = self.rows.gather(1, order[..., None].expand(-1, -1, self.rows.shape[2]))
        return self.values.gather(1, order), self.images.gather(1, order), rows, self.cls.gather(1, order)


def rank_keys(values: Float[Tensor, "d_sae imgs"], images: Int[Tensor, "1 imgs"]) -> Int[Tensor, "d_sae imgs"]:
    """Unique sortable keys: higher value first, then lower image index; -1 where the value is not positive."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(values > 0, (bits << 32) | (0xFFFFFFFF - images), -1)


def _first_per_row(rows: Tensor, cols: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Of (row, col) pairs sorted by row, the first n[row] of each row."""
    start = torch.zeros_like(n)
    start[1:] = torch.cumsum(torch.bincount(rows, minlength=len(n)), 0)[:-1]
    rank_in_row = torch.arange(len(rows), device=rows.device) - start[rows]
    keep = rank_in_row < n[rows]
    return rows[keep], cols[keep]


class _FiringStats:
    """Firing counts, value sums and log10 histograms over every vector of the token mode."""

    def __init__(self, d_sae: int, device: str):
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae * (len(HIST_EDGES) - 1), dtype=torch.int64, device=device)
        self.edges = torch.as_tensor(HIST_EDGES[1:-1], dtype=torch.float32, device=device)
        self.n_vectors = 0

    def update(self, f: Float[Tensor, "imgs tokens d_sae"]) -> None:
        """Count the firing entries of the token mode's vectors f; one pass to find them, the rest O(firing)."""
        _, _, latents = fires = (f > 0).nonzero(as_tuple=True)
        values = f[fires]
        self.count += torch.bincount(latents, minlength=len(self.count))
        self.total.index_add_(0, latents, values.double())
        bins = torch.bucketize(values.log10(), self.edges)  # 0..n_bins-1; outside: first or last
        self.hist.index_add_(0, latents * (len(HIST_EDGES) - 1) + bins, torch.ones_like(bins))
        self.n_vectors += f.shape[0] * f.shape[1]


def batch_images(n_tokens: int, d_sae: int, d_vit: int, device: str) -> int:
    """Images per SAE batch: the latents of a batch ([imgs, n_tokens, d_sae] float32, plus the input and temporaries
    of about as much again) take about 1 GB on CPU (a sixteenth of the RAM when that is less), or a quarter of the
    free memory of a GPU."""
    if device.startswith("cuda"):
        budget = torch.cuda.mem_get_info(torch.device(device))[0] // 4
    else:  # large batches amortise the per-batch merge over d_sae x (k + candidates): ~1 GB, less on small machines
        budget = min(2**30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 16)
    per_img = n_tokens * (d_sae + d_vit) * 4 * 2
    return max(1, budget // per_img)


def topk_bytes(d_sae: int, top_k: int, n_patches: int) -> int:
    """Memory of the running top-k lists (``_RunningTopK``: keys, images int64; values, CLS float32; the rows of
    n_patches float32) and of their copies as the cache's numpy arrays."""
    return 2 * d_sae * top_k * (8 + 8 + 4 + 4 + 4 * n_patches)


def check_top_k(store: ActivationStore, top_k: int, d_sae: int, device: str, flag: str = "--top-k") -> None:
    """Before allocating: ``top_k`` is at most the store's usable images (each image enters a latent's list once, so
    more slots stay empty; the default, 128, is allowed on a smaller store) and its lists fit in the memory
    ``device`` has free."""
    n_images = int(store.usable_images().sum())
    limit = max(n_images, config.VisualsConfig.top_k)
    if top_k > limit:
        raise UserError(
            f"{flag} {top_k} is more than the {n_images} usable images of the store {store.path} (each image enters "
            f"a latent's list at most once, so the other slots would stay empty); pass {flag} {limit} or less."
        )
    n_patches = store.n_tokens - first_patch(store)
    config.check_memory(
        topk_bytes(d_sae, top_k, n_patches),
        device,
        f"{flag} {top_k}: the top-k lists ({d_sae} latents x {top_k} images x ({n_patches} patches + 6) x 4 bytes, "
        "and their copy in the cache)",
        f"Lower {flag}.",
    )


@torch.inference_mode()
def topk_pass(
    store: ActivationStore,
    layer: int,
    patches: str,
    sae,
    top_k: int,
    identity: CacheIdentity,
    device: str = "cpu",
    imgs_per_batch: int | None = None,
    show_progress: bool = False,
    on_batch=None,
    n_threads: int | None = None,
) -> TopKCache:
    """Stream every valid image of the layer through ``sae`` (raw activations in: it normalises itself).
    ``on_batch(image_ids, ranking_values [imgs, d_sae])``, when given, sees every batch (the class association
    collects its matrix there, so it needs no pass of its own). ``n_threads``: torch's CPU threads; None times the
    batches and picks (``saev_core.threads``)."""
    check_rank_mode(store, patches)
    if top_k < 1:
        raise UserError(f"--top-k {top_k} must be at least 1 (128 is saev's default).")
    check_top_k(store, top_k, sae.cfg.d_sae, device)
    sae = sae.to(device).eval()
    d_sae, first = sae.cfg.d_sae, first_patch(store)
    n_patches = store.n_tokens - first
    images = np.flatnonzero(store.usable_images())
    imgs_per_batch = imgs_per_batch or batch_images(store.n_tokens, d_sae, store.d_vit, device)
    running = _RunningTopK(d_sae, top_k, n_patches, device)
    stats = _FiringStats(d_sae, device)
    n_per_img = n_patches if patches == "patches" else 1

    def encode(xs: list[np.ndarray], ids: list[np.ndarray]) -> None:
        x_all, id_all = np.concatenate(xs), np.concatenate(ids)
        for start in range(0, len(x_all), imgs_per_batch):  # a chunk larger than a batch is split
            encode_batch(x_all[start : start + imgs_per_batch], id_all[start : start + imgs_per_batch])

    def encode_batch(x: np.ndarray, ids: np.ndarray) -> None:
        x = torch.from_numpy(x).to(device, torch.float32)
        f = sae.encode(x.reshape(-1, store.d_vit)).reshape(len(x), store.n_tokens, d_sae)
        patch_f = f[:, first:]
        cls_f = f[:, 0] if first else None
        stats.update(patch_f if patches == "patches" else f[:, :1])
        rank = patch_f.amax(dim=1) if patches == "patches" else cls_f
        running.update(rank, patch_f, cls_f, torch.from_numpy(ids).to(device))
        if on_batch is not None:
            on_batch(ids, rank)
        bar.update(len(x) * n_per_img)
        tuner.step_done(len(x))

    ipc = store.layout.imgs_per_chunk
    chunks, starts = np.unique(images // ipc, return_index=True)
    xs, ids, n = [], [], 0
    reader = ChunkReader(store.array(layer))
    tuner = threads.tuner_for(n_threads, device)
    with (
        threads.apply(tuner),
        tqdm(
            total=len(images) * n_per_img, unit="vec", unit_scale=True, desc="top-k", disable=not show_progress
        ) as bar,
    ):
        for c, imgs, x in stream_chunks(reader, chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
            xs.append(x[imgs - c * ipc])
            ids.append(imgs)
            n += len(imgs)
            if n >= imgs_per_batch:
                encode(xs, ids)
                xs, ids, n = [], [], 0
        if xs:  # the last partial batch counts too
            encode(xs, ids)

    values, top_images, rows, cls = running.result()
    count = stats.count.cpu().numpy()
    return TopKCache(
        identity=identity,
        top_values=values.cpu().numpy(),
        top_images=top_images.cpu().numpy(),
        top_patches=rows.cpu().numpy(),
        top_cls=cls.cpu().numpy(),
        freq=count / max(stats.n_vectors, 1),
        mean_value=np.divide(stats.total.cpu().numpy(), count, out=np.zeros(d_sae), where=count > 0),
        hist=stats.hist.reshape(d_sae, -1).cpu().numpy(),
        n_vectors=stats.n_vectors,
    )


def check_rank_mode(store: ActivationStore, patches: str) -> None:
    if patches not in RANK_MODES:
        raise UserError(f"--data.patches {patches!r} cannot rank images for visuals; use patches (best patch) or cls.")
    if patches == "cls" and not store.metadata.cls_token:
        raise UserError(
            f"--data.patches cls needs a CLS token, but the store {store.path} was recorded without one. "
            "Use --data.patches patches."
        )
