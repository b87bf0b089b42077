"""Stores of activations that did not come from ``record_activations``: computed elsewhere, or planted with a known
answer in tests and benchmarks (``write_store``, ``arrays_metadata``)."""

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np

from saev_core.store.activation_store import ActivationStore
from saev_core.store.metadata import StoreMetadata


def arrays_metadata(
    n_imgs: int,
    n_tokens: int,
    d_vit: int,
    layers: Sequence[int] = (-2,),
    *,
    cls_token: bool = True,
    imgs_per_shard: int | None = None,
    dtype: str = "float32",
    fingerprint: str = "arrays",
    patch_labels_fingerprint: str | None = None,
    **fields,
) -> StoreMetadata:
    """The metadata of a store of activations that did not come from ``record_activations`` (see ``write_store``):
    ``imgs_per_shard`` images per block (default: one block), ``fingerprint`` standing for the images,
    ``patch_labels_fingerprint`` for the patch labels (None: the store has none), ``fields`` overriding any other
    ``StoreMetadata`` field."""
    prints = {"vit_ckpt": "arrays", "images": fingerprint}
    if patch_labels_fingerprint is not None:
        prints["patch_labels"] = patch_labels_fingerprint
    return StoreMetadata(
        **{
            "vit_family": "clip",
            "vit_ckpt": "arrays/none",
            "d_vit": d_vit,
            "layers": tuple(layers),
            "n_patches_per_img": n_tokens - int(cls_token),
            "cls_token": cls_token,
            "n_imgs": n_imgs,
            "n_patches_per_shard": (imgs_per_shard or n_imgs) * n_tokens * len(layers),
            "data": {"kind": "arrays"},
            "seed": 0,
            "dtype": dtype,
            "fingerprints": prints,
            **fields,
        }
    )


def write_store(
    root: str,
    acts: np.ndarray | Callable[[int, int], np.ndarray],
    layers: Sequence[int] = (-2,),
    *,
    shape: tuple[int, int, int] | None = None,
    cls_token: bool = True,
    imgs_per_shard: int | None = None,
    valid: np.ndarray | None = None,
    image_paths: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] = ("",),
    dtype: str = "float32",
    fingerprint: str | None = None,
    patch_labels: np.ndarray | None = None,
    patch_class_names: Sequence[str] | None = None,
    **fields,
) -> ActivationStore:
    """A complete store of activations that did not come from ``record_activations``: computed elsewhere, or planted
    with a known answer in tests and benchmarks.

    ``acts`` is [n_layers, n_imgs, n_tokens, d_vit], or a function (start, end) -> [n_layers, end - start, n_tokens,
    d_vit] called once per block (then ``shape`` = (n_imgs, n_tokens, d_vit) and ``fingerprint`` are required), so a
    store larger than memory can be planted. ``fingerprint`` stands for the images (default: a hash of ``acts``), so
    different data gets a different key. ``patch_labels`` (int [n_imgs, n_patches_per_img], 0 = unlabelled, 1..C)
    with ``patch_class_names`` (C + 1 names, index 0 "unlabelled"; default "unlabelled", "1", ..., "C") plants
    per-patch labels; they enter the key. ``fields`` set other ``StoreMetadata`` fields (``resolved_layers``...).
    """
    if callable(acts):
        if shape is None or fingerprint is None:
            raise ValueError("write_store with a block function needs shape and fingerprint")
        n_imgs, n_tokens, d_vit = shape
    else:
        _, n_imgs, n_tokens, d_vit = acts.shape
        fingerprint = fingerprint or hashlib.sha256(np.ascontiguousarray(acts).data).hexdigest()[:16]
    labels_print = None
    if patch_labels is not None:
        patch_labels = np.asarray(patch_labels)
        if patch_labels.shape != (n_imgs, n_tokens - int(cls_token)) or not np.issubdtype(
            patch_labels.dtype, np.integer
        ):
            raise ValueError(
                f"patch_labels must be integers of shape {(n_imgs, n_tokens - int(cls_token))}, got "
                f"{patch_labels.dtype} {patch_labels.shape}"
            )
        if patch_class_names is None:
            patch_class_names = ["unlabelled", *map(str, range(1, max(int(patch_labels.max(initial=0)), 1) + 1))]
        patch_class_names = [str(name) for name in patch_class_names]
        wide = np.ascontiguousarray(patch_labels, dtype=np.int64)
        labels_print = (
            hashlib.sha256(wide.data).hexdigest()[:16]
            + hashlib.sha256(json.dumps(patch_class_names).encode()).hexdigest()[:16]
        )
    elif patch_class_names is not None:
        raise ValueError("patch_class_names without patch_labels")
    meta = arrays_metadata(
        n_imgs,
        n_tokens,
        d_vit,
        layers,
        cls_token=cls_token,
        imgs_per_shard=imgs_per_shard,
        dtype=dtype,
        fingerprint=fingerprint,
        patch_labels_fingerprint=labels_print,
        **fields,
    )
    paths = list(image_paths) if image_paths is not None else [f"{i}.png" for i in range(n_imgs)]
    store = ActivationStore.create(
        root,
        meta,
        paths,
        list(labels) if labels is not None else [0] * n_imgs,
        list(class_names),
        patch_class_names=patch_class_names,
    )
    for block in store.missing_blocks():
        start, end = store.layout.block_range(block)
        block_acts = acts(start, end) if callable(acts) else acts[:, start:end]
        store.write_block(
            block,
            np.asarray(block_acts, dtype=dtype),
            None if valid is None else valid[start:end],
            None if patch_labels is None else patch_labels[start:end],
        )
    return store
