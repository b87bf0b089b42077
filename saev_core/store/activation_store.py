"""The activation store: a zarr v3 group with one array per recorded layer.

Layout and the meaning of every field: docs/store-format.md. A block is one zarr shard (the same image range in
every layer); it is written whole, once, and marked complete in ``progress`` only after all its layers are
written, so a killed writer never leaves a block that looks complete.
"""

import contextlib
import functools
import os
import time
from collections.abc import Sequence

import numpy as np
import zarr
import zarr.errors

from saev_core.errors import UserError
from saev_core.files import check_url, is_url, join, storage_errors, write_error
from saev_core.store.location import check_local_store_path, zarr_store
from saev_core.store.metadata import FORMAT_VERSION, Layout, StoreMetadata
from saev_core.store.shards import PlainShardLayout

PATCH_LABELS = "patch_labels"
"""The array of per-patch class labels (segmentation stores only)."""


def layer_name(layer: int) -> str:
    return f"layer_{layer}"


def patch_label_dtype(n_classes: int) -> str:
    """uint8 while the classes fit (masks are 8-bit, so every recorded store), int16 beyond."""
    if n_classes > np.iinfo(np.int16).max:
        raise ValueError(f"{n_classes} patch classes do not fit int16")
    return "uint8" if n_classes <= 255 else "int16"


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
            check_local_store_path(path_or_url)
        try:
            with storage_errors(path_or_url, "The activation store"):
                group = zarr.open_group(zarr_store(path_or_url, mode), mode=mode)
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
        patch_class_names: Sequence[str] | None = None,
    ) -> "ActivationStore":
        """Create the store <root>/<key> (or reopen it to resume when it exists with the same image index).

        ``patch_class_names`` (index 0 = unlabelled, then classes 1..C) adds the ``patch_labels`` array, which every
        ``write_block`` then fills; such a store must carry ``fingerprints["patch_labels"]`` so that its key differs
        from the same activations without labels. Arrays are created before the attributes, so a store whose
        creation was killed has no format_version and is created again.
        """
        if not is_url(root) and os.path.exists(root) and not os.path.isdir(root):
            raise UserError(f"--dump-to {root!r} is a file, not a folder. Pass a folder (it is created if missing).")
        if len(image_paths) != metadata.n_imgs or len(image_labels) != metadata.n_imgs:
            raise ValueError("image index length differs from n_imgs")
        if (patch_class_names is not None) != ("patch_labels" in metadata.fingerprints):
            raise ValueError("a store has patch_class_names exactly when its fingerprints name its patch labels")
        if patch_class_names is not None and len(patch_class_names) < 2:
            raise ValueError(f"patch_class_names {list(patch_class_names)} need 'unlabelled' and at least one class")
        layout, n_tokens, d_vit = metadata.layout, metadata.n_tokens, metadata.d_vit
        path = join(root, metadata.key)
        existing = open_if_created(path)
        if existing is not None:
            existing.check_image_index(image_paths, image_labels)
            return existing

        with storage_errors(path, "--dump-to"):
            group = zarr.open_group(zarr_store(path, "w"), mode="w")
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
        if patch_class_names is not None:
            group.create_array(
                PATCH_LABELS,
                shape=(layout.n_imgs, metadata.n_patches_per_img),
                dtype=patch_label_dtype(len(patch_class_names) - 1),
                chunks=(layout.imgs_per_shard, metadata.n_patches_per_img),
                fill_value=0,
                attributes={"class_names": [str(name) for name in patch_class_names]},
            )
        group.create_array("progress", shape=(layout.n_blocks,), dtype="uint8", chunks=(1,), fill_value=0)
        group.create_group("stats")
        group.attrs.update(metadata.attrs())
        return cls(zarr.open_group(zarr_store(path, "r+"), mode="r+"), path)

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
        """The IMAGE-level classes (an image's first sub-folder), indexed by ``image_labels()``."""
        return list(self.group["image_index"].attrs["class_names"])

    @property
    def patch_class_names(self) -> list[str]:
        """The PATCH-level classes, indexed by ``patch_labels()``: index 0 is "unlabelled", then classes 1..C;
        ``[]`` when the store has no patch labels."""
        if PATCH_LABELS not in self.group:
            return []
        return [str(name) for name in self.group[PATCH_LABELS].attrs["class_names"]]

    def patch_labels(self) -> np.ndarray | None:
        """[n_imgs, n_patches_per_img] integer (uint8, or int16 past 255 classes): each patch's class (0 =
        unlabelled, 1..C), row i for image i; None when the store has no patch labels. Rows of images that failed
        to decode and of blocks not yet written are 0."""
        if PATCH_LABELS not in self.group:
            return None
        return np.asarray(self.group[PATCH_LABELS][:])

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

    def write_block(
        self,
        block: int,
        acts: np.ndarray,
        valid: np.ndarray | None = None,
        patch_labels: np.ndarray | None = None,
    ) -> None:
        """Write one whole block for all layers (and its patch labels), then mark it complete.

        acts: [n_layers, n_imgs_in_block, n_tokens, d_vit] in the order of ``self.layers``.
        valid: bool [n_imgs_in_block], False where an image failed to decode (optional).
        patch_labels: int [n_imgs_in_block, n_patches_per_img] in 0..C; required exactly when the store has them.
        """
        start, end = self.layout.block_range(block)
        expected = (len(self.layers), end - start, self.n_tokens, self.d_vit)
        if tuple(acts.shape) != expected:
            raise ValueError(f"block {block} needs acts of shape {expected}, got {tuple(acts.shape)}")
        labels = self._check_patch_labels(block, end - start, patch_labels)
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
            if labels is not None:
                self.group[PATCH_LABELS][start:end] = labels
            self._progress[block] = 1
        except OSError as err:  # full disk, read-only, permissions: the block stays unmarked, the rerun writes it
            raise write_error(f"{self.path} (block {block})", err) from None

    def _check_patch_labels(self, block: int, n: int, labels: np.ndarray | None) -> np.ndarray | None:
        """The block's patch labels in the stored dtype; ValueError when they are missing, unexpected, of the wrong
        shape, or outside 0..C."""
        names = self.patch_class_names
        if not names:
            if labels is not None:
                raise ValueError(f"{self.path} has no patch labels, but block {block} was given some")
            return None
        expected = (n, self.metadata.n_patches_per_img)
        if labels is None or tuple(np.shape(labels)) != expected:
            got = None if labels is None else tuple(np.shape(labels))
            raise ValueError(f"block {block} of {self.path} needs patch labels of shape {expected}, got {got}")
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(f"block {block}: patch labels outside 0..{len(names) - 1} ({len(names) - 1} classes)")
        return labels.astype(patch_label_dtype(len(names) - 1))

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
        with storage_errors(path, "The activation store"):
            group = zarr.open_group(zarr_store(path, "r+"), mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if group.attrs.get("format_version") != FORMAT_VERSION:
        return None
    return ActivationStore(group, path)
