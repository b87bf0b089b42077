"""The activation store: a zarr v3 group with one array per recorded layer.

Layout and the meaning of every field: docs/store-format.md. A block is one zarr shard (the same image range in
every layer); it is written whole, once, and marked complete in ``progress`` only after all its layers are
written, so a killed writer never leaves a block that looks complete.
"""

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import zarr
import zarr.errors

from saev_core.errors import UserError
from saev_core.files import check_url, is_url, join, write_error
from saev_core.store.metadata import FORMAT_VERSION, Layout, StoreMetadata
from saev_core.store.shards import PlainShardLayout


def layer_name(layer: int) -> str:
    return f"layer_{layer}"


class ActivationStore:
    """A recorded activation store. Open with ``ActivationStore.open(path_or_url)``; make one with ``create``."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = group.attrs.asdict()
        if attrs.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path} is not an activation store of format {FORMAT_VERSION} "
                f"(format_version={attrs.get('format_version')!r}). Pass the path that "
                "`python -m saev_core activations` printed last."
            )
        self.metadata: StoreMetadata = StoreMetadata.from_attrs(attrs)
        """Typed; reads like the dict of the store's attributes too (``store.metadata["key"]``)."""
        self.layout: Layout = self.metadata.layout

    # -- opening and creating -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path_or_url: str, mode: str = "r") -> "ActivationStore":
        """Open an existing store from a local path or an fsspec URL (s3://, gs://, memory://)."""
        check_url(path_or_url, "The activation store")
        if not is_url(path_or_url):
            _check_local_store_path(path_or_url)
        try:
            group = zarr.open_group(path_or_url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as err:
            raise UserError(
                f"No activation store at {path_or_url!r} ({type(err).__name__}: {err}). Pass the path that "
                "`python -m saev_core activations` printed on its last line."
            ) from None
        return cls(group, path_or_url)

    @classmethod
    def create(
        cls,
        root: str,
        metadata: StoreMetadata,
        image_paths: list[str],
        image_labels: list[int],
        class_names: list[str],
    ) -> "ActivationStore":
        """Create the store <root>/<key> (or reopen it to resume when it exists with the same image index).

        Arrays are created before the attributes, so a store whose creation was killed has no format_version
        and is created again.
        """
        if not is_url(root) and os.path.exists(root) and not os.path.isdir(root):
            raise UserError(f"--dump-to {root!r} is a file, not a folder. Pass a folder (it is created if missing).")
        if len(image_paths) != metadata.n_imgs or len(image_labels) != metadata.n_imgs:
            raise ValueError("image index length differs from n_imgs")
        layout, n_tokens, d_vit = metadata.layout, metadata.n_tokens, metadata.d_vit
        path = join(root, metadata.key)
        existing = open_if_created(path)
        if existing is not None:
            existing.check_image_index(image_paths, image_labels)
            return existing

        group = zarr.open_group(path, mode="w")
        for layer in metadata.layers:
            group.create_array(
                layer_name(layer),
                shape=(layout.n_imgs, n_tokens, d_vit),
                dtype=metadata.dtype,
                compressors=None,
                fill_value=0,
                chunks=(layout.imgs_per_chunk, n_tokens, d_vit),
                shards=(layout.imgs_per_shard, n_tokens, d_vit),
            )
        index = group.create_group("image_index", attributes={"class_names": list(class_names)})
        paths = index.create_array("path", shape=(layout.n_imgs,), dtype=str, chunks=(layout.n_imgs,))
        paths[:] = np.asarray(image_paths, dtype=str)
        labels = index.create_array("label", shape=(layout.n_imgs,), dtype="int32", chunks=(layout.n_imgs,))
        labels[:] = np.asarray(image_labels, dtype=np.int32)
        index.create_array(
            "valid", shape=(layout.n_imgs,), dtype="uint8", chunks=(layout.imgs_per_shard,), fill_value=1
        )
        group.create_array("progress", shape=(layout.n_blocks,), dtype="uint8", chunks=(1,), fill_value=0)
        group.create_group("stats")
        group.attrs.update(metadata.attrs())
        return cls(zarr.open_group(path, mode="r+"), path)

    # -- reading --------------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """The layers as recorded (e.g. [-2])."""
        return list(self.metadata.layers)

    @property
    def n_imgs(self) -> int:
        return self.layout.n_imgs

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens

    @property
    def d_vit(self) -> int:
        return self.layout.d_vit

    @property
    def class_names(self) -> list[str]:
        return list(self.group["image_index"].attrs["class_names"])

    def recorded_layer(self, layer: int) -> int:
        """The recorded key for a layer given as recorded (-2) or as its resolved block index (10)."""
        layers, resolved = self.layers, list(self.metadata.resolved_layers)
        if layer in layers:
            return layer
        if layer in resolved:
            return layers[resolved.index(layer)]
        raise UserError(
            f"Layer {layer} is not in the store {self.path}: it holds layers {layers} (blocks {resolved}). "
            f"Pick one of those, or record layer {layer} with `activations --vit-layers {layer}`."
        )

    def array(self, layer: int) -> zarr.Array:
        """The zarr array [n_imgs, n_tokens, d_vit] of a layer (recorded key -2 or resolved index 10)."""
        return self.group[layer_name(self.recorded_layer(layer))]

    def image_paths(self) -> list[str]:
        return [str(p) for p in self.group["image_index/path"][:]]

    def image_labels(self) -> np.ndarray:
        return np.asarray(self.group["image_index/label"][:])

    def patch_labels(self) -> np.ndarray | None:
        """int [n_imgs, n_patches_per_img]: each patch's class (0 = unlabelled, 1..C), or None without labels."""
        if "patch_labels" not in self.group:
            return None
        return np.asarray(self.group["patch_labels"][:])

    @property
    def patch_class_names(self) -> list[str]:
        """The patch classes, ``[0]`` = "unlabelled" (len C + 1); [] when the store has no patch labels."""
        if "patch_labels" not in self.group:
            return []
        return list(self.group["patch_labels"].attrs["class_names"])

    def valid_images(self) -> np.ndarray:
        """bool [n_imgs]: False for images skipped because they failed to decode (--data.skip-bad)."""
        return np.asarray(self.group["image_index/valid"][:]).astype(bool)

    def completed_blocks(self) -> np.ndarray:
        return np.asarray(self.group["progress"][:]).astype(bool)

    def missing_blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.completed_blocks())]

    def usable_images(self) -> np.ndarray:
        """bool [n_imgs]: the valid images of a complete store (UserError when blocks are missing)."""
        missing = self.missing_blocks()
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UserError(
                f"The store {self.path} is incomplete: blocks {missing[:10]}{more} of {self.layout.n_blocks} were "
                "never written. Run `python -m saev_core activations` again with the same settings to finish it."
            )
        return self.valid_images()

    @property
    def is_complete(self) -> bool:
        return bool(self.completed_blocks().all())

    def missing_bytes(self) -> int:
        """Bytes of the blocks not yet complete (what a resumed recording still writes)."""
        per_img = self.n_tokens * self.d_vit * len(self.layers) * self.metadata.itemsize
        return sum(end - start for start, end in map(self.layout.block_range, self.missing_blocks())) * per_img

    def nbytes(self) -> int:
        return self.metadata.nbytes()

    def check_image_index(self, image_paths: list[str], image_labels: list[int]) -> None:
        """Refuse to resume into a store recorded from other images."""
        stored = self.image_paths()
        if stored != list(image_paths) or not np.array_equal(self.image_labels(), np.asarray(image_labels)):
            diff = next(
                (i for i, (a, b) in enumerate(zip(stored, image_paths)) if a != b), min(len(stored), len(image_paths))
            )
            raise UserError(
                f"The store {self.path} was recorded from a different image list (first difference at index "
                f"{diff}). Record into a new --dump-to folder, or delete {self.path} to record it again."
            )

    # -- writing --------------------------------------------------------------------------------------------------

    def write_block(self, block: int, acts: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Write one whole block for all layers, then mark it complete.

        acts: [n_layers, n_imgs_in_block, n_tokens, d_vit] in the order of ``self.layers``.
        valid: bool [n_imgs_in_block], False where an image failed to decode (optional).
        """
        start, end = self.layout.block_range(block)
        expected = (len(self.layers), end - start, self.n_tokens, self.d_vit)
        if tuple(acts.shape) != expected:
            raise ValueError(f"block {block} needs acts of shape {expected}, got {tuple(acts.shape)}")
        if not all_finite(acts):
            raise UserError(
                f"Block {block} (images {start}..{end - 1}) has NaN or Inf activations; nothing was marked "
                "complete. Check the ViT checkpoint and the --dtype (float16 overflows on large activations)."
            )
        try:
            for i, (arr, plain) in enumerate(self._layer_writers):
                if plain is not None and end - start == self.layout.imgs_per_shard:
                    plain.write_shard(block, acts[i])  # a whole shard: its file directly, without zarr's two copies
                else:
                    arr[start:end] = acts[i]
            if valid is not None and not np.all(valid):
                self.group["image_index/valid"][start:end] = np.asarray(valid, dtype=np.uint8)
            self._progress[block] = 1
        except OSError as err:  # full disk, read-only, permissions: the block stays unmarked, the rerun writes it
            raise write_error(f"{self.path} (block {block})", err) from None

    def remove_stale_partials(self, blocks: Sequence[int], everything: bool) -> list[str]:
        """Remove the temporary files (``*.partial``: our shard writer's and zarr's) that a killed writer left in
        this local store: those of ``blocks`` (the blocks this run writes), and with ``everything`` (no other
        writer may be at work) every one. Returns the removed paths."""
        if is_url(self.path):
            return []
        mine, removed = {int(b) for b in blocks}, []
        for dirpath, _, filenames in os.walk(self.path):
            for name in filenames:
                if not name.endswith(".partial"):
                    continue
                path = os.path.join(dirpath, name)
                parts = os.path.relpath(path, self.path).split(os.sep)
                block = parts[parts.index("c") + 1].split(".")[0] if "c" in parts[:-1] else ""
                if everything or (block.isdigit() and int(block) in mine):
                    with contextlib.suppress(OSError):
                        os.remove(path)
                        removed.append(path)
        return removed

    @functools.cached_property
    def _layer_writers(self) -> list[tuple[zarr.Array, "PlainShardLayout | None"]]:
        """Each layer's array and its plain layout (None: write through zarr); looked up once, not per block."""
        arrays = [self.group[layer_name(layer)] for layer in self.layers]
        return [(arr, PlainShardLayout.of(arr)) for arr in arrays]

    @functools.cached_property
    def _progress(self) -> zarr.Array:
        return self.group["progress"]

    # -- normalisation statistics (filled by training) -----------------------------------------------------------

    def write_stats(self, layer: int, patches: str, mean: np.ndarray, scale: float, n_vectors: int) -> None:
        """Store the mean vector and norm scale of a layer for one token mode (patches, cls, meanpool). Two fan-out
        parts that finish together may both write them (the same numbers): nothing here deletes what the other
        wrote, and a collision inside zarr's look-then-create is retried."""
        name = f"stats/{layer_name(self.recorded_layer(layer))}/{patches}"
        for attempt in range(5):
            try:
                group = zarr.open_group(self.group.store, path=name, mode="a")
                try:
                    arr = group.create_array("mean", shape=mean.shape, dtype="float64", compressors=None)
                except zarr.errors.ContainsArrayError:
                    arr = group["mean"]
                arr[:] = mean.astype(np.float64)
                group.attrs.update({"scale": float(scale), "n_vectors": int(n_vectors)})
                return
            except (zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError, FileNotFoundError, KeyError):
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def read_stats(self, layer: int, patches: str) -> tuple[np.ndarray, float] | None:
        name = f"stats/{layer_name(self.recorded_layer(layer))}/{patches}"
        try:
            group = self.group[name]
        except KeyError:
            return None
        if "scale" not in group.attrs:
            return None
        return np.asarray(group["mean"][:]), float(group.attrs["scale"])


def _check_local_store_path(path: str) -> None:
    """A local path that is not a store: say what it is instead (missing, a file, a part of a store, the folder of
    stores above one) and which path to pass."""
    printed = "Pass the path that `python -m saev_core activations` printed on its last line (<dump_to>/<key>)."
    if not os.path.isdir(path):
        what = "is a file, not an activation store" if os.path.exists(path) else "does not exist"
        raise UserError(f"No activation store at {path!r}: it {what}. {printed}")
    if _is_store_folder(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if _is_store_folder(parent):
            raise UserError(
                f"{path!r} is a part (an array or group) inside the activation store {parent}; pass "
                f"the store itself: {parent}"
            )
        parent = os.path.dirname(parent)
    try:
        stores = sorted(name for name in os.listdir(path) if _is_store_folder(os.path.join(path, name)))
    except OSError:
        stores = []
    if stores:
        shown = ", ".join(os.path.join(path, s) for s in stores[:3]) + (" ..." if len(stores) > 3 else "")
        raise UserError(
            f"{path!r} is the folder that holds activation stores (--dump-to), not a store; pass one "
            f"of the stores in it: {shown}"
        )
    raise UserError(
        f"No activation store at {path!r}: the folder has no zarr.json with a store's format_version "
        f"(a recording killed while creating the store leaves that: run it again). {printed}"
    )


def _is_store_folder(folder: str) -> bool:
    """Whether ``folder`` holds a zarr group whose attributes carry the store's format_version."""
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict) and meta.get("node_type") == "group" and "format_version" in meta.get("attributes", {})
    )


def all_finite(x: np.ndarray) -> bool:
    """Whether x has no NaN or Inf. A BLAS dot product of x with itself (about twice as fast as np.isfinite, and
    it allocates nothing) is finite exactly when x is, unless huge values overflow it: only then check element-wise."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.dot(flat, flat))) or bool(np.isfinite(x).all())


def open_if_created(path: str) -> ActivationStore | None:
    """The store at path when it exists and its creation finished (to resume into it); None otherwise."""
    try:
        group = zarr.open_group(path, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if group.attrs.get("format_version") != FORMAT_VERSION:
        return None
    return ActivationStore(group, path)


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
    **fields,
) -> StoreMetadata:
    """The metadata of a store of activations that did not come from ``record_activations`` (see ``write_store``):
    ``imgs_per_shard`` images per block (default: one block), ``fingerprint`` standing for the images, ``fields``
    overriding any other ``StoreMetadata`` field."""
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
            "fingerprints": {"vit_ckpt": "arrays", "images": fingerprint},
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
    different data gets a different key. ``fields`` set other ``StoreMetadata`` fields (``resolved_layers``...).
    ``patch_labels`` [n_imgs, n_patches_per_img] (0 = unlabelled, 1..C) with ``patch_class_names`` (len C + 1, [0] =
    "unlabelled") plant per-patch labels.
    """
    if callable(acts):
        if shape is None or fingerprint is None:
            raise ValueError("write_store with a block function needs shape and fingerprint")
        n_imgs, n_tokens, d_vit = shape
    else:
        _, n_imgs, n_tokens, d_vit = acts.shape
        digest = hashlib.sha256(np.ascontiguousarray(acts).data)
        if patch_labels is not None:
            digest.update(np.ascontiguousarray(patch_labels, dtype=np.int16).data)
        fingerprint = fingerprint or digest.hexdigest()[:16]
    meta = arrays_metadata(
        n_imgs,
        n_tokens,
        d_vit,
        layers,
        cls_token=cls_token,
        imgs_per_shard=imgs_per_shard,
        dtype=dtype,
        fingerprint=fingerprint,
        **fields,
    )
    paths = list(image_paths) if image_paths is not None else [f"{i}.png" for i in range(n_imgs)]
    store = ActivationStore.create(
        root, meta, paths, list(labels) if labels is not None else [0] * n_imgs, list(class_names)
    )
    for block in store.missing_blocks():
        start, end = store.layout.block_range(block)
        block_acts = acts(start, end) if callable(acts) else acts[:, start:end]
        store.write_block(block, np.asarray(block_acts, dtype=dtype), None if valid is None else valid[start:end])
    if patch_labels is not None and "patch_labels" not in store.group:
        labels_arr = store.group.create_array("patch_labels", shape=patch_labels.shape, dtype="int16")
        labels_arr[:] = np.asarray(patch_labels, dtype=np.int16)
        labels_arr.attrs["class_names"] = list(patch_class_names or [])
    return store
