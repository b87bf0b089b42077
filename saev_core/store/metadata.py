"""What an activation store holds, typed: its metadata, its key and its layout (images per shard and per chunk).

The meaning of every field: docs/store-format.md. ``StoreMetadata`` is what recording decides before any activation
is computed; it validates itself, builds the store key, and plans the layout. A store's ``.metadata`` is a
``StoreMetadata`` that reads like the dict of the store's attributes too (``meta["key"]``, ``dict(meta)``), for
users who want one.
"""

import collections.abc
import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

from saev_core.errors import UserError

FORMAT_VERSION = 1
CHUNK_TARGET_BYTES = 4 * 1024 * 1024
"""Inner chunks hold whole images and about this many bytes: big enough to read at disk speed."""
DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How images map to shards (blocks) and inner chunks."""

    n_imgs: int
    n_tokens: int
    d_vit: int
    n_layers: int
    imgs_per_shard: int
    imgs_per_chunk: int

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_imgs / self.imgs_per_shard)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.imgs_per_shard
        return start, min(start + self.imgs_per_shard, self.n_imgs)


def plan_layout(
    n_imgs: int, n_tokens: int, d_vit: int, n_layers: int, n_patches_per_shard: int, itemsize: int
) -> Layout:
    """Images per shard as in saev (n_patches_per_shard // (n_layers * n_tokens)); inner chunks of ~4 MB of
    whole images; the shard is a multiple of the chunk and no larger than the data needs."""
    if n_imgs < 1:
        raise UserError(f"Nothing to record: the image source has {n_imgs} images. Point --data.root at images.")
    imgs_per_shard = n_patches_per_shard // (n_layers * n_tokens)
    if imgs_per_shard < 1:
        raise UserError(
            f"--n-patches-per-shard {n_patches_per_shard} is smaller than one image's patches over all layers "
            f"({n_layers} layers x {n_tokens} tokens = {n_layers * n_tokens}); pass at least {n_layers * n_tokens}."
        )
    target = max(1, CHUNK_TARGET_BYTES // (n_tokens * d_vit * itemsize))
    imgs_per_shard = min(imgs_per_shard, n_imgs)
    # Prefer a chunk that divides the shard exactly; when only a small one does, shrink the shard instead.
    imgs_per_chunk = max(d for d in range(1, min(target, imgs_per_shard) + 1) if imgs_per_shard % d == 0)
    if imgs_per_chunk * 2 <= min(target, imgs_per_shard):
        imgs_per_chunk = min(target, imgs_per_shard)
        imgs_per_shard -= imgs_per_shard % imgs_per_chunk
    return Layout(n_imgs, n_tokens, d_vit, n_layers, imgs_per_shard, imgs_per_chunk)


@dataclasses.dataclass(frozen=True, eq=True)
class StoreMetadata(collections.abc.Mapping):
    """The store's attributes. The first twelve fields (``KEY_FIELDS``) decide its content and so its key: any
    change gives a new store, never a silent merge. ``layout`` is planned from them unless given (a store opened
    from disk keeps the layout it was written with)."""

    vit_family: str
    vit_ckpt: str
    d_vit: int
    layers: Sequence[int]
    """As the user asked for them (-2 stays -2); kept as a tuple."""
    n_patches_per_img: int
    cls_token: bool
    n_imgs: int
    n_patches_per_shard: int
    data: dict
    """The image source's fields that decide the content."""
    seed: int
    dtype: str
    fingerprints: dict
    """Content hashes of the ViT checkpoint (``vit_ckpt``) and of the image list (``images``)."""
    resolved_layers: Sequence[int] = ()
    """The block index of each layer (-2 of 12 blocks is 10); defaults to ``layers``."""
    n_blocks_in_vit: int | None = None
    image_root: str | None = None
    """Absolute folder the image index's paths are relative to."""
    layout: Layout | None = dataclasses.field(default=None, compare=False)

    KEY_FIELDS = (
        "vit_family",
        "vit_ckpt",
        "d_vit",
        "layers",
        "n_patches_per_img",
        "cls_token",
        "n_imgs",
        "n_patches_per_shard",
        "data",
        "seed",
        "dtype",
        "fingerprints",
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "layers", tuple(int(x) for x in self.layers))
        set_(self, "resolved_layers", tuple(int(x) for x in (self.resolved_layers or self.layers)))
        problems = [
            *(
                f"{name} {getattr(self, name)!r} must be at least 1"
                for name in ("d_vit", "n_patches_per_img", "n_patches_per_shard")
                if getattr(self, name) < 1
            ),
            *([f"dtype {self.dtype!r} is not one of {list(DTYPES)}"] if self.dtype not in DTYPES else []),
            *(["no layers"] if not self.layers else []),
            *(
                [f"layers {list(self.layers)} and resolved_layers {list(self.resolved_layers)} differ in length"]
                if len(self.layers) != len(self.resolved_layers)
                else []
            ),
            *(
                [f"fingerprints {self.fingerprints!r} lack 'vit_ckpt' or 'images'"]
                if not {"vit_ckpt", "images"} <= set(self.fingerprints)
                else []
            ),
        ]
        if problems:
            raise ValueError("invalid store metadata: " + "; ".join(problems))
        if self.layout is None:
            set_(
                self,
                "layout",
                plan_layout(
                    self.n_imgs,
                    self.n_tokens,
                    self.d_vit,
                    len(self.layers),
                    self.n_patches_per_shard,
                    np.dtype(self.dtype).itemsize,
                ),
            )

    # -- derived --------------------------------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return self.n_patches_per_img + int(self.cls_token)

    @property
    def key(self) -> str:
        """Short hash of the key fields (metadata + checkpoint and image fingerprints)."""
        blob = json.dumps({f: getattr(self, f) for f in self.KEY_FIELDS}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def nbytes(self) -> int:
        """Bytes of every layer's array."""
        return self.n_imgs * self.n_tokens * self.d_vit * len(self.layers) * self.itemsize

    # -- as the store's attributes --------------------------------------------------------------------------------

    def attrs(self) -> dict:
        """The zarr attributes the store is written with (optional fields left out when unknown)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layout"}
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if v is not None}
        return {
            **fields,
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "n_tokens": self.n_tokens,
            "imgs_per_shard": self.layout.imgs_per_shard,
            "imgs_per_chunk": self.layout.imgs_per_chunk,
            "n_blocks": self.layout.n_blocks,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> "StoreMetadata":
        """Read a store's attributes back (its stored layout kept); KeyError names a missing field."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "layout"]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in attrs]
        if missing:
            raise KeyError(f"store attributes lack {missing}")
        layout = Layout(
            attrs["n_imgs"],
            attrs["n_patches_per_img"] + int(attrs["cls_token"]),
            attrs["d_vit"],
            len(attrs["layers"]),
            attrs["imgs_per_shard"],
            attrs["imgs_per_chunk"],
        )
        return cls(**{name: attrs[name] for name in names if name in attrs}, layout=layout)

    # Mapping: read like the attribute dict.
    def __getitem__(self, name: str):
        return self._attrs[name]

    def __iter__(self):
        return iter(self._attrs)

    def __len__(self) -> int:
        return len(self._attrs)

    @property
    def _attrs(self) -> dict:
        if "_attrs_cache" not in self.__dict__:
            object.__setattr__(self, "_attrs_cache", self.attrs())
        return self.__dict__["_attrs_cache"]

    __hash__ = None  # holds dicts
