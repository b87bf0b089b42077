"""The activation store: a zarr v3 group with one array per recorded layer.

Layout and the meaning of every field: docs/store-format.md. A block is one zarr shard (the same image range in
every layer); it is written whole, once, and marked complete in ``progress`` only after all its layers are
written, so a killed writer never leaves a block that looks complete.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import uuid

import google_crc32c
import numpy as np
import zarr
import zarr.buffer.cpu
import zarr.storage

from saev_core.errors import UserError

FORMAT_VERSION = 1
CHUNK_TARGET_BYTES = 4 * 1024 * 1024
"""Inner chunks hold whole images and about this many bytes: big enough to read at disk speed."""

KEY_FIELDS = (
    "vit_family", "vit_ckpt", "d_vit", "layers", "n_patches_per_img", "cls_token", "n_imgs",
    "n_patches_per_shard", "data", "seed", "dtype", "fingerprints",
)
"""The metadata fields the store key hashes: any change gives a new store, never a silent merge."""


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


def store_key(metadata: dict) -> str:
    """Short hash of the fields that decide the store's content (metadata + checkpoint and image fingerprints)."""
    missing = [f for f in KEY_FIELDS if f not in metadata]
    if missing:
        raise ValueError(f"store metadata lacks {missing}")
    blob = json.dumps({f: metadata[f] for f in KEY_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


EMPTY_CHUNK = 2**64 - 1
"""Shard index entry (offset and nbytes) of an inner chunk that was not stored: it holds only the fill value."""


@dataclasses.dataclass(frozen=True)
class PlainShardLayout:
    """The bytes of a layer array on a local disk, when it has exactly the codecs ``ActivationStore.create`` writes.

    Such an array (zarr v3 sharding, uncompressed little-endian inner chunks of whole images, index at the end) keeps
    each shard in one file, ``<folder>/c/<shard>/0/0``: the stored inner chunks concatenated (each one the array's
    C-order bytes), then the index, one (offset, nbytes) uint64 little-endian pair per inner chunk
    (``EMPTY_CHUNK`` twice for one not stored), then the crc32c of the index. The loader reads chunks and the
    writer writes whole shards this way, without zarr's copies; anything else goes through zarr.
    """

    arr: zarr.Array
    folder: str
    """The array's folder on the local disk."""
    chunks_per_shard: int
    chunk_bytes: int

    @classmethod
    def of(cls, arr: zarr.Array) -> "PlainShardLayout | None":
        """The layout of ``arr``, or None when it is not a local array with exactly these codecs."""
        shards, chunks = arr.shards, arr.chunks
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        expected = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(chunks), "codecs": [little], "index_codecs": [little, {"name": "crc32c"}],
            "index_location": "end",
        }}]
        if not (
            isinstance(arr.store, zarr.storage.LocalStore)
            and sys.byteorder == "little"  # zarr's crc32c codec writes the checksum in native byte order
            and shards is not None
            and tuple(chunks[1:]) == tuple(arr.shape[1:]) == tuple(shards[1:])
            and json.loads(json.dumps(arr.metadata.to_dict()["codecs"])) == expected  # to_dict keeps tuples
        ):
            return None
        folder = os.path.join(str(arr.store.root), arr.path)
        return cls(arr, folder, shards[0] // chunks[0], math.prod(chunks) * arr.dtype.itemsize)

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.folder, self.arr.metadata.encode_chunk_key((shard, 0, 0)))

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def encode_index(self, index: np.ndarray) -> bytes:
        """The stored index of [chunks_per_shard, 2] (offset, nbytes): the pairs, then their crc32c."""
        raw = np.ascontiguousarray(index, dtype="<u8").tobytes()
        return raw + google_crc32c.value(raw).to_bytes(4, "little")

    def decode_index(self, stored: bytes) -> np.ndarray:
        """[chunks_per_shard, 2] (offset, nbytes) from a shard's last ``index_nbytes`` bytes; ValueError when the
        length or the checksum is wrong."""
        if len(stored) != self.index_nbytes:
            raise ValueError(f"a shard index of {self.chunks_per_shard} chunks has {self.index_nbytes} bytes, "
                             f"got {len(stored)}")
        raw, crc = stored[:-4], stored[-4:]
        if google_crc32c.value(raw).to_bytes(4, "little") != crc:
            raise ValueError("shard index checksum mismatch")
        return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)

    def write_shard(self, shard: int, data: np.ndarray) -> None:
        """Write the whole shard ``shard`` from data [imgs_per_shard, n_tokens, d] as zarr would, atomically.

        The same bytes as ``arr[a:b] = data`` (inner chunks that hold only the fill value are left out, as zarr
        does): written with one ``os.writev`` from data's own memory into a temporary file beside the shard, then
        renamed over it, so a killed writer leaves the old shard or none, never half of one.
        """
        data = np.ascontiguousarray(data, dtype=self.arr.dtype)
        if data.shape != (self.arr.shards[0], *self.arr.shape[1:]):
            raise ValueError(f"a whole shard has shape {(self.arr.shards[0], *self.arr.shape[1:])}, got {data.shape}")
        chunks = data.reshape(self.chunks_per_shard, -1)
        stored = np.array([not self._only_fill(chunk) for chunk in chunks])
        index = np.full((self.chunks_per_shard, 2), EMPTY_CHUNK, dtype="<u8")
        index[stored, 0] = np.arange(stored.sum()) * self.chunk_bytes
        index[stored, 1] = self.chunk_bytes
        # Views of data's own memory: one piece for the usual shard of all its chunks, else one per stored chunk.
        runs = [data.reshape(-1)] if stored.all() else [chunks[j] for j in np.flatnonzero(stored)]
        pieces = [memoryview(run).cast("B") for run in runs]
        path = self.shard_path(shard)
        if not pieces:  # zarr stores no file for a shard of fill values
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # the temporary name zarr's LocalStore uses
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            pieces.append(memoryview(self.encode_index(index)))
            _reserve(fd, sum(len(piece) for piece in pieces))
            _write_all(fd, pieces)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            os.remove(tmp)
            raise

    def _only_fill(self, chunk: np.ndarray) -> bool:
        """Whether zarr would leave this chunk out; its first element usually settles it without a full scan."""
        if self.arr.config.write_empty_chunks:
            return False
        fill = self.arr.fill_value
        return all(zarr.buffer.cpu.NDBuffer.from_numpy_array(x).all_equal(fill) for x in (chunk[:1], chunk))


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks up front, as numpy's tofile does: the write that follows then runs ~1.5x faster
    (ext4, page cache). Only a hint: where the file system cannot, the write allocates as it goes."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError:
            pass


def _write_all(fd: int, pieces: list[memoryview]) -> None:
    """os.writev until every byte is out (one call writes at most ~2 GB and IOV_MAX pieces)."""
    while pieces:
        n = os.writev(fd, pieces[:1024])
        while pieces and n >= len(pieces[0]):
            n -= len(pieces[0])
            pieces.pop(0)
        if pieces:
            pieces[0] = pieces[0][n:]


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


def layer_name(layer: int) -> str:
    return f"layer_{layer}"


class ActivationStore:
    """A recorded activation store. Open with ``ActivationStore.open(path_or_url)``; make one with ``create``."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self.metadata: dict = group.attrs.asdict()
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{path} is not an activation store of format {FORMAT_VERSION} "
                f"(format_version={self.metadata.get('format_version')!r}). Pass the path that "
                "`python -m saev_core activations` printed last."
            )
        m = self.metadata
        self.layout = Layout(
            m["n_imgs"], m["n_tokens"], m["d_vit"], len(m["layers"]), m["imgs_per_shard"], m["imgs_per_chunk"]
        )

    # -- opening and creating -------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path_or_url: str, mode: str = "r") -> "ActivationStore":
        """Open an existing store from a local path or an fsspec URL (s3://, gs://, memory://)."""
        if "://" not in path_or_url and not os.path.isdir(path_or_url):
            raise UserError(
                f"No activation store at {path_or_url!r}. Pass the path that `python -m saev_core activations` "
                "printed on its last line (<dump_to>/<key>)."
            )
        try:
            group = zarr.open_group(path_or_url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise UserError(
                f"No activation store at {path_or_url!r} ({err}). Pass the path that `python -m saev_core "
                "activations` printed on its last line."
            ) from None
        return cls(group, path_or_url)

    @classmethod
    def create(
        cls,
        root: str,
        metadata: dict,
        image_paths: list[str],
        image_labels: list[int],
        class_names: list[str],
    ) -> "ActivationStore":
        """Create the store <root>/<key> (or reopen it to resume when it exists with the same image index).

        ``metadata`` holds the fields in KEY_FIELDS plus ``resolved_layers``; the layout fields are added here.
        Arrays are created before the attributes, so a store whose creation was killed has no format_version
        and is created again.
        """
        if "://" not in root and os.path.exists(root) and not os.path.isdir(root):
            raise UserError(f"--dump-to {root!r} is a file, not a folder. Pass a folder (it is created if missing).")
        if len(image_paths) != metadata["n_imgs"] or len(image_labels) != metadata["n_imgs"]:
            raise ValueError("image index length differs from n_imgs")
        dtype = np.dtype(metadata["dtype"])
        n_tokens = metadata["n_patches_per_img"] + int(metadata["cls_token"])
        layout = plan_layout(
            metadata["n_imgs"], n_tokens, metadata["d_vit"], len(metadata["layers"]),
            metadata["n_patches_per_shard"], dtype.itemsize,
        )
        key = store_key(metadata)
        path = join(root, key)
        existing = open_if_created(path)
        if existing is not None:
            existing.check_image_index(image_paths, image_labels)
            return existing

        group = zarr.open_group(path, mode="w")
        shape = (layout.n_imgs, n_tokens, metadata["d_vit"])
        for layer in metadata["layers"]:
            group.create_array(
                layer_name(layer), shape=shape, dtype=dtype, compressors=None, fill_value=0,
                chunks=(layout.imgs_per_chunk, n_tokens, metadata["d_vit"]),
                shards=(layout.imgs_per_shard, n_tokens, metadata["d_vit"]),
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
        group.attrs.update({
            **metadata,
            "format_version": FORMAT_VERSION,
            "key": key,
            "n_tokens": n_tokens,
            "imgs_per_shard": layout.imgs_per_shard,
            "imgs_per_chunk": layout.imgs_per_chunk,
            "n_blocks": layout.n_blocks,
        })
        return cls(zarr.open_group(path, mode="r+"), path)

    # -- reading --------------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """The layers as recorded (e.g. [-2])."""
        return list(self.metadata["layers"])

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
        layers, resolved = self.layers, list(self.metadata["resolved_layers"])
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

    @property
    def is_complete(self) -> bool:
        return bool(self.completed_blocks().all())

    def missing_bytes(self) -> int:
        """Bytes of the blocks not yet complete (what a resumed recording still writes)."""
        per_img = self.n_tokens * self.d_vit * len(self.layers) * np.dtype(self.metadata["dtype"]).itemsize
        return sum(end - start for start, end in map(self.layout.block_range, self.missing_blocks())) * per_img

    def nbytes(self) -> int:
        return self.n_imgs * self.n_tokens * self.d_vit * len(self.layers) * np.dtype(self.metadata["dtype"]).itemsize

    def check_image_index(self, image_paths: list[str], image_labels: list[int]) -> None:
        """Refuse to resume into a store recorded from other images."""
        stored = self.image_paths()
        if stored != list(image_paths) or not np.array_equal(self.image_labels(), np.asarray(image_labels)):
            diff = next((i for i, (a, b) in enumerate(zip(stored, image_paths)) if a != b), min(len(stored), len(image_paths)))
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
        for i, (arr, plain) in enumerate(self._layer_writers):
            if plain is not None and end - start == self.layout.imgs_per_shard:
                plain.write_shard(block, acts[i])  # a whole shard: its file directly, without zarr's two copies
            else:
                arr[start:end] = acts[i]
        if valid is not None and not np.all(valid):
            self.group["image_index/valid"][start:end] = np.asarray(valid, dtype=np.uint8)
        self._progress[block] = 1

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
        """Store the mean vector and norm scale of a layer for one token mode (patches, cls, meanpool)."""
        name = f"stats/{layer_name(self.recorded_layer(layer))}/{patches}"
        group = zarr.open_group(self.group.store, path=name, mode="a")
        arr = group.create_array("mean", shape=mean.shape, dtype="float64", overwrite=True, compressors=None)
        arr[:] = mean.astype(np.float64)
        group.attrs.update({"scale": float(scale), "n_vectors": int(n_vectors)})

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
        group = zarr.open_group(path, mode="r+")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    if group.attrs.get("format_version") != FORMAT_VERSION:
        return None
    return ActivationStore(group, path)
