"""The top-k cache, ``<dump_to>/cache/topk.npz``: what the top-k pass (``top_images``) found, written as one file
atomically and read back, with the inputs that made it (the SAE file's content hash, the store key, the layer, the
token mode and k). Format: docs/visuals-format.md.

Imports neither torch nor scipy, so the explorer shows a latent from the cache without them (``top_images``, which
runs the pass, imports torch)."""

import dataclasses
import hashlib
import os

import numpy as np
from jaxtyping import Float, Int

from saev_core.errors import UserError
from saev_core.visuals.npz_cache import identity_mismatch, read_npz_with_meta, write_npz_with_meta

CACHE_VERSION = 1
HIST_EDGES = np.linspace(-6.0, 4.0, 51)
"""log10 bin edges of the value histograms (values outside go to the first or last bin)."""


@dataclasses.dataclass(frozen=True)
class CacheIdentity:
    """What a cache was made from: a cache is reused only for exactly these inputs."""

    sae_sha256: str
    store_key: str
    layer: int
    """The recorded layer key (-2), whatever form the user gave."""
    patches: str
    top_k: int
    version: int = CACHE_VERSION


@dataclasses.dataclass
class TopKCache:
    """The result of the pass. Empty slots (fewer than k images fire a latent) have image -1 and value 0."""

    identity: CacheIdentity
    top_values: Float[np.ndarray, "d_sae k"]
    """The ranking value: the image's best patch (patches) or its CLS value (cls)."""
    top_images: Int[np.ndarray, "d_sae k"]
    top_patches: Float[np.ndarray, "d_sae k n_patches"]
    """Every patch's value of the latent on that image (the heatmap)."""
    top_cls: Float[np.ndarray, "d_sae k"]
    """The latent's value on the image's CLS token (NaN when the store has none)."""
    freq: Float[np.ndarray, " d_sae"]
    """Fraction of the token mode's vectors with f > 0."""
    mean_value: Float[np.ndarray, " d_sae"]
    """Mean of f over the vectors where f > 0 (0 for a dead latent)."""
    hist: Int[np.ndarray, "d_sae n_bins"]
    """Counts of log10(f) over the firing vectors, bins ``HIST_EDGES``."""
    n_vectors: int

    @property
    def d_sae(self) -> int:
        return len(self.freq)

    def n_images(self) -> Int[np.ndarray, " d_sae"]:
        return (self.top_images >= 0).sum(axis=1)


_ARRAYS = ("top_values", "top_images", "top_patches", "top_cls", "freq", "mean_value", "hist")


def cache_path(dump_to: str) -> str:
    return os.path.join(dump_to, "cache", "topk.npz")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def save_cache(cache: TopKCache, dump_to: str) -> str:
    """Write the cache as one npz file, atomically."""
    meta = {**dataclasses.asdict(cache.identity), "n_vectors": cache.n_vectors, "hist_edges": HIST_EDGES.tolist()}
    return write_npz_with_meta(cache_path(dump_to), meta, {name: getattr(cache, name) for name in _ARRAYS})


def read_cache(dump_to: str) -> TopKCache | None:
    """The cache under dump_to whatever made it (its identity from its meta); None when there is none; UserError
    when it cannot be read."""

    def build(meta: dict, arrays: dict[str, np.ndarray]) -> TopKCache:
        identity = CacheIdentity(**{f.name: meta.get(f.name) for f in dataclasses.fields(CacheIdentity)})
        return TopKCache(identity=identity, n_vectors=int(meta["n_vectors"]), **arrays)

    return read_npz_with_meta(cache_path(dump_to), _ARRAYS, build, what="The top-k cache")


def load_cache(dump_to: str, identity: CacheIdentity) -> TopKCache | None:
    """The cache under dump_to when it was made from ``identity``; None when there is none; UserError when it was
    made from other inputs (another SAE, store, layer, token mode or k)."""
    cache = read_cache(dump_to)
    if cache is None:
        return None
    diff = identity_mismatch(dataclasses.asdict(cache.identity), identity)
    if diff:
        raise UserError(
            f"The top-k cache {cache_path(dump_to)} was made from other inputs ({diff}). Pass another --dump-to, or "
            f"delete {os.path.dirname(cache_path(dump_to))} to compute it again for these."
        )
    return cache
