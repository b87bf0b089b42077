"""The plain-shard byte format of a layer array: its writer and its reader, in one place.

A layer array written by ``ActivationStore.create`` on a local disk (zarr v3 sharding, uncompressed little-endian
inner chunks of whole images, the index at the end) keeps each shard in one file. ``PlainShardLayout`` says where
its bytes are; ``PlainShardLayout.write_shard`` writes a whole shard with one ``os.writev`` (byte-identical to
zarr's output) and ``ChunkReader`` reads inner chunks with ``preadv`` straight into the caller's memory, either
whole or each vector into its own batch row (``Scatter``). Anything else (other codecs, fsspec URLs, a shard index
that does not check out) goes through zarr, which reads and writes the same bytes, only slower.
The format itself: docs/store-format.md.
"""

import collections
import concurrent.futures
import ctypes
import dataclasses
import errno
import json
import math
import os
import sys
import uuid
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import google_crc32c
import numpy as np
import zarr
import zarr.buffer.cpu
import zarr.storage

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
        expected = [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(chunks),
                    "codecs": [little],
                    "index_codecs": [little, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ]
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
            raise ValueError(
                f"a shard index of {self.chunks_per_shard} chunks has {self.index_nbytes} bytes, got {len(stored)}"
            )
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


# libc's preadv(fd, iovecs, count, offset), called on an array of (address, length) pairs that numpy computes for a
# whole chunk at once. os.preadv wants one Python buffer object per destination: making them (42 K per window of
# the benchmark) held the GIL for a third of the time the kernel took to copy, and the loader reached 0.6 of a
# sequential read instead of 0.9-1.2.
try:
    _preadv = ctypes.CDLL(None, use_errno=True).preadv
    _preadv.restype, _preadv.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
except (OSError, AttributeError):  # no preadv (Windows): every read goes through zarr
    _preadv = None
_IOV_MAX = 1024  # (address, length) pairs per preadv call: Linux's and macOS's IOV_MAX
# Up to this many unwanted vectors between wanted ones (a CLS token) are read into a junk row: one call, not two.
_JUNK_GAP = 4


class ScatterTarget(Protocol):
    """Where a ``Scatter`` sends vectors: numbered rows of float arrays (the loader's batches). The raw read needs
    rows of the array's own dtype (a float16 store: float16 rows, which the loader converts per batch); rows of
    another dtype are filled through zarr and ``put``."""

    dtype: np.dtype
    row_bytes: int

    def iovecs(self, pos: np.ndarray, junk: np.ndarray) -> np.ndarray:
        """[len(pos), 2] uint64 (address, length) of the row of each position (negative: of junk)."""

    def put(self, pos: np.ndarray, vectors: np.ndarray) -> None:
        """Write vectors[i] at position pos[i] (negative: dropped)."""


class ChunkReader:
    """Reads whole inner chunks of a layer array (images [start, start + n)) into a caller's buffer or ``Scatter``.

    On a local disk, when the array has exactly the codecs ``ActivationStore.create`` writes
    (``PlainShardLayout``), a chunk's bytes are the array's bytes: they are read with one ``preadv`` straight into
    the buffer, as fast as ``np.fromfile`` (~10 GB/s from the page cache here), or each vector into its own batch
    row (one (address, length) pair per vector: 13 GB/s into reused memory). zarr's own read path makes two more
    copies and ran at 4-4.7 GB/s. Anything else (other codecs, fsspec URLs), or a shard index that does not look
    right (wrong size or checksum), goes through zarr.
    """

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self.plain = PlainShardLayout.of(arr) if _preadv is not None else None
        """Where the raw reads go; None when every read goes through zarr (other codecs, URLs, no preadv)."""
        self._indexes: dict[int, np.ndarray] = {}
        self._vector_bytes = arr.shape[-1] * arr.dtype.itemsize
        self._junk = np.empty(self._vector_bytes, np.uint8)  # unwanted vectors land here (any thread); never read

    def read(self, start: int, dest: "np.ndarray | Scatter") -> None:
        """Fill dest with images start..start+n-1 of one chunk: an array [n, tokens, d] (C-contiguous, the array's
        dtype), or a Scatter [n, tokens] that says where each vector goes."""
        if self.plain is not None and self._read_raw(start, dest):
            return
        x = dest if isinstance(dest, np.ndarray) else np.empty((len(dest.pos), *self.arr.shape[1:]), self.arr.dtype)
        self.arr.get_basic_selection((slice(start, start + len(x)),), out=zarr.buffer.cpu.NDBuffer.from_numpy_array(x))
        if isinstance(dest, Scatter):
            dest.put(x)

    def _open(self, start: int) -> tuple[int, int, int]:
        """(fd of the chunk's shard file, shard, inner chunk); FileNotFoundError when the shard was never stored."""
        chunk = start // self.arr.chunks[0]
        shard, inner = divmod(chunk, self.plain.chunks_per_shard)
        return os.open(self.plain.shard_path(shard), os.O_RDONLY), shard, inner

    def _index(self, fd: int, shard: int) -> np.ndarray:
        """[chunks_per_shard, 2] (offset, nbytes) of the inner chunks; ValueError when it does not check out."""
        if shard not in self._indexes:
            size, n = os.fstat(fd).st_size, self.plain.index_nbytes
            if size < n:
                raise ValueError(f"shard {shard} is shorter than its index")
            self._indexes[shard] = self.plain.decode_index(os.pread(fd, n, size - n))
        return self._indexes[shard]

    def _read_raw(self, start: int, dest: "np.ndarray | Scatter") -> bool:
        """Read from the shard file; False where zarr has to (a chunk stored otherwise, an index that does not check
        out, a file shorter than its index says)."""
        try:
            fd, shard, inner = self._open(start)
        except FileNotFoundError:  # a shard never stored holds only the fill value
            return self._fill(dest)
        try:
            offset, nbytes = self._index(fd, shard)[inner]
            if offset == EMPTY_CHUNK and nbytes == EMPTY_CHUNK:
                return self._fill(dest)
            if nbytes != self.plain.chunk_bytes:
                return False
            if isinstance(dest, Scatter):
                return dest.batches.dtype == self.arr.dtype and self._scatter(fd, int(offset), dest)
            if not (dest.flags.c_contiguous and dest.flags.writeable) or dest.dtype != self.arr.dtype:
                return False
            # An edge chunk is stored whole: read only dest's images.
            return _preadv_all(fd, np.array([[dest.ctypes.data, dest.nbytes]], np.uint64), int(offset))
        except ValueError:
            return False
        finally:
            os.close(fd)

    def _scatter(self, fd: int, offset: int, dest: "Scatter") -> bool:
        """Read the wanted vectors of the chunk at offset straight into their batch rows, one call per run of them."""
        flat = dest.pos.ravel()
        wanted = np.flatnonzero(flat >= 0)
        if len(wanted) == 0:
            return True
        lo, size = int(wanted[0]), self._vector_bytes
        iovecs = dest.batches.iovecs(flat[lo : wanted[-1] + 1], self._junk)
        cuts = np.flatnonzero(np.diff(wanted) > _JUNK_GAP + 1)
        for first, last in zip([lo, *wanted[cuts + 1].tolist()], [*wanted[cuts].tolist(), int(wanted[-1])]):
            if not _preadv_all(fd, iovecs[first - lo : last - lo + 1], offset + first * size):
                return False
        return True

    def _fill(self, dest: "np.ndarray | Scatter") -> bool:
        if isinstance(dest, Scatter):
            dest.put(np.full((*dest.pos.shape, self.arr.shape[-1]), self.arr.fill_value, self.arr.dtype))
        else:
            dest[...] = self.arr.fill_value
        return True


def _preadv_all(fd: int, iovecs: np.ndarray, offset: int) -> bool:
    """Fill the buffers iovecs [n, 2] uint64 (address, length), all of one length, with the file's bytes from
    offset on, in order; False when the file ends first. The caller keeps the buffers alive."""
    address, size, i = iovecs.ctypes.data, int(iovecs[0, 1]), 0
    while i < len(iovecs):
        n = _preadv(fd, address + 16 * i, min(_IOV_MAX, len(iovecs) - i), offset)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, os.strerror(err))
        if n == 0:
            return False
        done, part = divmod(n, size)
        i, offset = i + done, offset + n
        if part:  # a short read stopped inside a buffer: finish that one alone
            if not _preadv_all(fd, np.array([[iovecs[i, 0] + part, size - part]], np.uint64), offset):
                return False
            i, offset = i + 1, offset + size - part
    return True


class Scatter(NamedTuple):
    """A destination for ``ChunkReader.read`` that spreads the vectors of one chunk over batches: token t of image i
    of the chunk goes to stream position ``pos[i, t]`` of ``batches`` (negative: not wanted; it is read only when
    that saves a call)."""

    pos: np.ndarray
    """int64 [n_imgs, n_tokens]."""
    batches: ScatterTarget

    @property
    def nbytes(self) -> int:
        """Store bytes of the images it covers (what a whole-chunk read moves)."""
        return self.pos.size * self.batches.row_bytes

    def put(self, x: np.ndarray) -> None:
        """Place the wanted vectors of x [n_imgs, n_tokens, d], the chunk's images."""
        self.batches.put(self.pos.ravel(), x.reshape(self.pos.size, -1))


def stream_chunks(
    reader: "ChunkReader", chunks, chunk_images, ipc: int, n_imgs: int, n_ahead: int = 2
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (chunk, its images, chunk array [imgs, tokens, d]) in store order, reading up to n_ahead chunks ahead
    in a thread: one sequential pass over whole chunks (statistics, top-k visuals)."""

    def read(c: int) -> np.ndarray:
        start = c * ipc
        x = np.empty((min(ipc, n_imgs - start), *reader.arr.shape[1:]), reader.arr.dtype)
        reader.read(start, x)
        return x

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="saev-stats") as pool:
        ahead: collections.deque = collections.deque()
        todo = iter(zip(chunks, chunk_images))
        try:
            while True:
                while len(ahead) < n_ahead and (nxt := next(todo, None)) is not None:
                    c = int(nxt[0])
                    ahead.append((c, nxt[1], pool.submit(read, c)))
                if not ahead:
                    return
                c, imgs, future = ahead.popleft()
                yield c, imgs, future.result()
        finally:
            for *_, future in ahead:
                future.cancel()
