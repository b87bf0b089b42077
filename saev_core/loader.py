"""Shuffled batches of activation vectors from one layer of an activation store, for SAE training.

Vectors are raw activations (float32); the SAE normalises them itself with the statistics from ``normalization``.

**Token modes.** ``patches``: every patch vector of an image (tokens 1.. when the store has a CLS token, all tokens
otherwise); ``cls``: token 0; ``meanpool``: the mean of an image's patch tokens.

**Train/val split** (``split_images``). Whole images are held out, never single patches: exactly
``round(val_frac * n_valid)`` valid images (at least one when ``val_frac > 0``, never all of them). They are taken
a whole inner chunk at a time, chunks drawn in a random order seeded by ``seed``, so that every chunk but at most
one belongs entirely to one split and reads stay chunk-aligned; the last chunk drawn gives only the images still
needed (its first ones), and both splits read that one chunk and keep their own images. Invalid images (failed to
decode) are in neither split. A store with unwritten blocks is refused.

**Order of one epoch** (a pure function of ``seed`` and ``epoch``): the split's chunks are permuted by a generator
seeded with (seed, epoch); consecutive groups of ``buffer_chunks`` chunks form windows; each window's vectors are
permuted by a generator seeded with (seed, epoch, window index); the concatenation of the permuted windows is cut
into batches of ``batch_size``. Batches run on across window boundaries, and the last batch of an epoch is yielded
short (every vector is seen exactly once per epoch; ``len(loader)`` counts it). Resuming at ``n_vectors_done``
skips the windows before it without reading them and yields exactly the batches an uninterrupted run would.

**Reading.** A producer thread reads whole chunks (``imgs_per_chunk`` images, straight into a window buffer;
``ChunkReader``) with a small thread pool, reading the next window while it cuts the batches of the current one,
and hands batches over through a bounded queue; an exception there is raised again in the consumer.

**Statistics** (``compute_stats``, ``normalization``) are computed over every valid image of the store, train and
val alike: the store caches one mean and one scale per (layer, token mode), which therefore cannot depend on a
split seed or ``val_frac``; the held-out images lend the SAE two summary numbers of unlabelled data, nothing more.
"""

import collections
import concurrent.futures
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
import zarr
import zarr.buffer.cpu
from jaxtyping import Float

from saev_core import config
from saev_core.errors import UserError
from saev_core.store import EMPTY_CHUNK, ActivationStore, PlainShardLayout

TOKEN_MODES = ("patches", "cls", "meanpool")

# Every random stream gets its own tag and a key of fixed length: numpy's SeedSequence treats [a, b] and [a, b, 0]
# alike, so keys of different purposes must not differ only by trailing zeros.
_SPLIT, _ORDER, _WINDOW = 1, 2, 3


# ----------------------------------------------------------------------------------------------------------------
# Splits and token modes
# ----------------------------------------------------------------------------------------------------------------


def usable_images(store: ActivationStore) -> np.ndarray:
    """bool [n_imgs]: the valid images of a complete store (UserError when blocks are missing)."""
    missing = store.missing_blocks()
    if missing:
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise UserError(
            f"The store {store.path} is incomplete: blocks {missing[:10]}{more} of {store.layout.n_blocks} were "
            "never written. Run `python -m saev_core activations` again with the same settings to finish it."
        )
    return store.valid_images()


def split_images(store: ActivationStore, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) image indices, sorted, int64. See the module docstring for how whole chunks are held out."""
    if not 0.0 <= val_frac < 1.0:
        raise UserError(f"--data.val-frac {val_frac} is outside [0, 1). Pass the fraction of images to hold out, "
                        "e.g. 0.1.")
    _check_seed(seed)
    valid = usable_images(store)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UserError(f"Every image of the store {store.path} is marked invalid (failed to decode); there is "
                        "nothing to train on. Check the image folder and record again.")
    n_val = min(n_valid - 1, max(int(val_frac > 0), round(val_frac * n_valid)))
    ipc, n_imgs = store.layout.imgs_per_chunk, store.n_imgs
    is_val = np.zeros(n_imgs, dtype=bool)
    need = n_val
    for c in np.random.default_rng([_SPLIT, seed]).permutation(math.ceil(n_imgs / ipc)):
        if need == 0:
            break
        imgs = c * ipc + np.flatnonzero(valid[c * ipc:(c + 1) * ipc])
        is_val[imgs[:need]] = True
        need -= len(imgs[:need])
    return np.flatnonzero(valid & ~is_val), np.flatnonzero(is_val)


def check_token_mode(store: ActivationStore, patches: str) -> None:
    if patches not in TOKEN_MODES:
        raise UserError(f"--data.patches {patches!r} is not a token mode; use one of {list(TOKEN_MODES)}.")
    if patches == "cls" and not store.metadata["cls_token"]:
        raise UserError(
            f"--data.patches cls needs a CLS token, but the store {store.path} was recorded without one "
            "(--no-cls-token). Use --data.patches patches or --data.patches meanpool."
        )


def vectors_per_image(store: ActivationStore, patches: str) -> int:
    return store.n_tokens - _first_patch(store) if patches == "patches" else 1


def _first_patch(store: ActivationStore) -> int:
    return int(bool(store.metadata["cls_token"]))


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise UserError(f"--seed {seed} is negative; pass a seed >= 0.")


def _image_vectors(x: np.ndarray, patches: str, first_patch: int, out: np.ndarray | None = None) -> np.ndarray:
    """One vector per image of x [imgs, tokens, d]: the CLS token or the mean of the patch tokens (float32)."""
    if patches == "cls":
        if out is None:
            return x[:, 0].astype(np.float32)
        out[...] = x[:, 0]
        return out
    return np.mean(x[:, first_patch:], axis=1, dtype=np.float32, out=out)


def _vectors(x: np.ndarray, patches: str, first_patch: int) -> Float[np.ndarray, "n d_vit"]:
    """The vectors of a token mode for images x [imgs, tokens, d], as float32."""
    if patches == "patches":
        return x[:, first_patch:].reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    return _image_vectors(x, patches, first_patch)


# ----------------------------------------------------------------------------------------------------------------
# Reading whole chunks
# ----------------------------------------------------------------------------------------------------------------


class ChunkReader:
    """Reads whole inner chunks of a layer array (images [start, start + n)) into a caller's buffer.

    On a local disk, when the array has exactly the codecs ``ActivationStore.create`` writes
    (``PlainShardLayout``), a chunk's bytes are the array's bytes: they are read with one ``os.preadv`` straight
    into the buffer, as fast as ``np.fromfile`` (~10 GB/s from the page cache here); zarr's own read path makes two
    more copies and ran at 4-4.7 GB/s. Anything else (other codecs, fsspec URLs), or a shard index that does not
    look right (wrong size or checksum), goes through zarr.
    """

    def __init__(self, arr: zarr.Array):
        self.arr = arr
        self._plain = PlainShardLayout.of(arr)
        self._shard_dir = self._plain.folder if self._plain is not None else None
        self._indexes: dict[int, np.ndarray] = {}

    def read(self, start: int, dest: np.ndarray) -> None:
        """Fill dest [n, tokens, d] (C-contiguous, the array's dtype) with images start..start+n-1 of one chunk."""
        if self._plain is None or not self._read_raw(start, dest):
            self.arr.get_basic_selection((slice(start, start + len(dest)),),
                                         out=zarr.buffer.cpu.NDBuffer.from_numpy_array(dest))

    def _open(self, start: int) -> tuple[int, int, int]:
        """(fd of the chunk's shard file, shard, inner chunk); FileNotFoundError when the shard was never stored."""
        chunk = start // self.arr.chunks[0]
        shard, inner = divmod(chunk, self._plain.chunks_per_shard)
        return os.open(self._plain.shard_path(shard), os.O_RDONLY), shard, inner

    def _index(self, fd: int, shard: int) -> np.ndarray:
        """[chunks_per_shard, 2] (offset, nbytes) of the inner chunks; ValueError when it does not check out."""
        if shard not in self._indexes:
            size, n = os.fstat(fd).st_size, self._plain.index_nbytes
            if size < n:
                raise ValueError(f"shard {shard} is shorter than its index")
            self._indexes[shard] = self._plain.decode_index(os.pread(fd, n, size - n))
        return self._indexes[shard]

    def _read_raw(self, start: int, dest: np.ndarray) -> bool:
        try:
            fd, shard, inner = self._open(start)
        except FileNotFoundError:  # a shard never stored holds only the fill value
            dest[...] = self.arr.fill_value
            return True
        try:
            offset, nbytes = self._index(fd, shard)[inner]
            if offset == EMPTY_CHUNK and nbytes == EMPTY_CHUNK:
                dest[...] = self.arr.fill_value
                return True
            if nbytes != self._plain.chunk_bytes or not dest.flags.c_contiguous or dest.dtype != self.arr.dtype:
                return False
            view, done = memoryview(dest).cast("B"), 0  # an edge chunk is stored whole: read only dest's images
            while done < dest.nbytes:
                n = os.preadv(fd, [view[done:]], int(offset) + done)
                if n == 0:
                    return False
                done += n
            return True
        except ValueError:
            return False
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """The consumer went away; the producer unwinds."""


class ActivationLoader:
    """Shuffled float32 batches [batch, d_vit] of one split of one store layer; iterate once per epoch.

    ``epoch`` and ``n_vectors_done`` say where the next iteration starts; they advance as batches are handed out,
    and after the last batch of an epoch they read (epoch + 1, 0), so ``for batch in loader`` runs the next epoch.
    ``state_dict()``/``load_state_dict()`` save and restore them.
    """

    def __init__(
        self,
        store: ActivationStore,
        data_cfg: config.DataLoad,
        batch_size: int,
        seed: int,
        split: str = "train",
        n_read_threads: int = 2,
        epoch: int = 0,
        prefetch_batches: int = 4,
        pin_memory: bool = False,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1:
            raise UserError(f"Batch size {batch_size} must be at least 1.")
        if data_cfg.buffer_chunks < 1:
            raise UserError(f"--data.buffer-chunks {data_cfg.buffer_chunks} must be at least 1 (32 is typical).")
        check_token_mode(store, data_cfg.patches)
        self.store, self.data_cfg, self.batch_size, self.seed, self.split = store, data_cfg, batch_size, seed, split
        self.n_read_threads, self.prefetch_batches = max(1, n_read_threads), max(1, prefetch_batches)
        self.pin_memory = pin_memory
        self._arr = store.array(data_cfg.layer)
        self._reader = ChunkReader(self._arr)
        self.patches = data_cfg.patches
        self._first_patch = _first_patch(store)
        self._vpi = vectors_per_image(store, self.patches)

        train, val = split_images(store, data_cfg.val_frac, seed)
        self.images = train if split == "train" else val
        """The split's image indices (sorted)."""
        if len(self.images) == 0:
            raise UserError(
                f"The {split} split of the store {store.path} is empty (--data.val-frac {data_cfg.val_frac}, "
                f"{len(train) + len(val)} valid images). Raise --data.val-frac above 0 for a validation split."
            )
        self.n_vectors = len(self.images) * self._vpi
        """Vectors per epoch."""

        ipc = store.layout.imgs_per_chunk
        self._chunks, first = np.unique(self.images // ipc, return_index=True)
        self._chunk_imgs = np.array([min(ipc, store.n_imgs - c * ipc) for c in self._chunks])  # images read
        # The split's images inside each chunk, as offsets from the chunk's first image.
        self._local = [imgs - c * ipc for c, imgs in zip(self._chunks, np.split(self.images, first[1:]))]
        self._counts = np.array([len(loc) for loc in self._local]) * self._vpi
        self._row_tokens = (np.arange(self._first_patch, store.n_tokens) if self.patches == "patches"
                            else np.zeros(1, dtype=np.int64))
        self._rows_per_img = store.n_tokens if self.patches == "patches" else 1
        # Patch mode reads float32 chunks straight into the window buffer; the other modes reduce each chunk.
        self._direct = self.patches == "patches" and self._arr.dtype == np.float32

        self.epoch = epoch
        self.n_vectors_done = 0
        self._buffers: list[np.ndarray] | None = None  # the two window buffers, made on first use
        self._iterating = False

    def __len__(self) -> int:
        """Batches per full epoch (the last one may be short)."""
        return math.ceil(self.n_vectors / self.batch_size)

    # -- position ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "n_vectors_done": self.n_vectors_done}

    def load_state_dict(self, state: dict) -> None:
        self.start_at(state["n_vectors_done"], epoch=state["epoch"])

    def start_at(self, n_vectors_done: int, epoch: int | None = None) -> None:
        """Make the next iteration start after ``n_vectors_done`` vectors of ``epoch`` (default: the current one)."""
        if not 0 <= n_vectors_done <= self.n_vectors:
            raise ValueError(f"n_vectors_done {n_vectors_done} is outside [0, {self.n_vectors}]")
        self.epoch = self.epoch if epoch is None else epoch
        self.n_vectors_done = n_vectors_done
        self._advance(0)

    def _advance(self, n: int) -> None:
        self.n_vectors_done += n
        if self.n_vectors_done == self.n_vectors:
            self.epoch, self.n_vectors_done = self.epoch + 1, 0

    # -- iteration -----------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Float[torch.Tensor, "batch d_vit"]]:
        """The rest of the current epoch, from ``n_vectors_done``. One iteration at a time (they share buffers)."""
        if self._iterating:
            raise RuntimeError("this loader is already being iterated; finish or close() the other iterator first")
        self._iterating = True
        items: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._run_producer, args=(self.epoch, self.n_vectors_done, items, stop),
            name="saev-loader", daemon=True,
        )
        producer.start()
        try:
            while True:
                kind, item = items.get()
                if kind == "error":
                    raise item
                if kind == "done":
                    return
                self._advance(len(item))  # counted when handed out: a checkpoint after this step resumes after it
                yield item
        finally:
            stop.set()
            producer.join()
            self._iterating = False

    def _run_producer(self, epoch: int, start: int, items: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.05)
                    return
                except queue.Full:
                    pass
            raise _Stopped

        def emit(batch: np.ndarray) -> None:
            tensor = torch.from_numpy(batch)
            put(("batch", tensor.pin_memory() if self.pin_memory else tensor))

        try:
            self._produce(epoch, start, emit)
            put(("done", None))
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            try:
                put(("error", err))
            except _Stopped:
                pass

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The epoch's windows: arrays of indices into the split's chunks, in reading order."""
        order = np.random.default_rng([_ORDER, self.seed, epoch]).permutation(len(self._chunks))
        step = self.data_cfg.buffer_chunks
        return [order[i:i + step] for i in range(0, len(order), step)]

    def _produce(self, epoch: int, start: int, emit: Callable[[np.ndarray], None]) -> None:
        windows = self.windows(epoch)
        sizes = np.array([self._counts[w].sum() for w in windows])
        ends = np.cumsum(sizes)
        first = int(np.searchsorted(ends, start, side="right"))  # windows before it were consumed: never read
        if first == len(windows):
            return
        skip = start - int(ends[first] - sizes[first])
        img_shape = (self.store.n_tokens, self.store.d_vit) if self.patches == "patches" else (self.store.d_vit,)
        if self._buffers is None:  # kept across epochs: a fresh 100 MB allocation cost up to 0.5 s here
            n_imgs = min(len(self._chunks), self.data_cfg.buffer_chunks) * self.store.layout.imgs_per_chunk
            self._buffers = [np.empty((n_imgs, *img_shape), np.float32) for _ in range(2)]  # current, next window
            for buffer in self._buffers:
                # Fault the pages in from user space: random gathers over fresh pages that the kernel faulted in
                # itself (preadv into new memory) ran 3-5x slower here.
                buffer.fill(0)
        buffers = self._buffers
        carry = np.empty((0, self.store.d_vit), np.float32)
        with concurrent.futures.ThreadPoolExecutor(self.n_read_threads, thread_name_prefix="saev-read") as pool:
            nxt = self._read_window(pool, windows[first], buffers[first % 2])
            try:
                for w in range(first, len(windows)):
                    rows, futures = nxt
                    if w + 1 < len(windows):
                        nxt = self._read_window(pool, windows[w + 1], buffers[(w + 1) % 2])
                    for future in futures:
                        future.result()
                    order = rows[np.random.default_rng([_WINDOW, self.seed, epoch, w]).permutation(len(rows))]
                    vectors = buffers[w % 2].reshape(-1, self.store.d_vit)
                    carry = self._cut(vectors, order[skip if w == first else 0:], carry, emit)
            finally:
                for future in nxt[1]:
                    future.cancel()
        if len(carry):
            emit(carry)

    def _read_window(self, pool, window: np.ndarray, buffer: np.ndarray) -> tuple[np.ndarray, list]:
        """Start reading a window's chunks into buffer; return the buffer rows of its vectors and the futures."""
        rows, futures, offset = [], [], 0
        for k in window:
            n = int(self._chunk_imgs[k])
            futures.append(pool.submit(self._read_chunk, int(k), buffer[offset:offset + n]))
            imgs = offset + self._local[k]
            rows.append((imgs[:, None] * self._rows_per_img + self._row_tokens[None, :]).ravel())
            offset += n
        return np.concatenate(rows), futures

    def _read_chunk(self, k: int, dest: np.ndarray) -> None:
        start = int(self._chunks[k]) * self.store.layout.imgs_per_chunk
        if self._direct:
            self._reader.read(start, dest)
            return
        x = np.empty((len(dest), self.store.n_tokens, self.store.d_vit), self._arr.dtype)
        self._reader.read(start, x)
        if self.patches == "patches":
            dest[...] = x
        else:
            _image_vectors(x, self.patches, self._first_patch, out=dest)

    def _cut(self, vectors: np.ndarray, order: np.ndarray, carry: np.ndarray, emit) -> np.ndarray:
        """Emit the full batches of carry + vectors[order]; return what is left (copied out of the buffer)."""
        pos, bs = 0, self.batch_size
        if len(carry):
            pos = min(bs - len(carry), len(order))
            carry = np.concatenate([carry, np.take(vectors, order[:pos], axis=0)])
            if len(carry) < bs:
                return carry
            emit(carry)
        while len(order) - pos >= bs:
            emit(np.take(vectors, order[pos:pos + bs], axis=0))
            pos += bs
        return np.take(vectors, order[pos:], axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Normalisation statistics
# ----------------------------------------------------------------------------------------------------------------


def compute_stats(
    store: ActivationStore, layer: int, patches: str, images: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """(mean [d_vit] float64, scale) with E||(x - mean) * scale||^2 = d_vit over the vectors of a token mode.

    ``images`` defaults to every valid image of the store. One pass over whole chunks in order; sums in float64,
    chunk statistics merged with Chan et al.'s parallel update, so a large common offset costs no digits.
    """
    check_token_mode(store, patches)
    arr = store.array(layer)
    if images is None:
        images = np.flatnonzero(usable_images(store))
    ipc, first = store.layout.imgs_per_chunk, _first_patch(store)
    tokens = slice(first, None) if patches != "cls" else slice(0, 1)
    chunks, starts = np.unique(images // ipc, return_index=True)
    n, mean, m2 = 0, np.zeros(store.d_vit), 0.0
    for c, imgs, x in _stream_chunks(ChunkReader(arr), chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
        x = x[imgs - c * ipc]
        finite = np.isfinite(x[:, tokens]).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            bad = int(imgs[np.argmin(finite)])
            raise UserError(
                f"The store {store.path}, layer {layer}, has NaN or Inf activations in image {bad} "
                f"({store.image_paths()[bad]}). Record the layer again (check the ViT checkpoint, and --dtype: "
                "float16 overflows on large activations)."
            )
        v = _vectors(x, patches, first).astype(np.float64)
        mean_c = v.mean(axis=0)
        m2_c = float(np.square(v - mean_c).sum())
        delta, total = mean_c - mean, n + len(v)
        mean += delta * (len(v) / total)
        m2 += m2_c + float(delta @ delta) * n * len(v) / total
        n = total
    if n == 0:
        raise UserError(f"No vectors to compute statistics on in the store {store.path}, layer {layer}.")
    if m2 == 0:
        raise UserError(
            f"All {n} {patches} vectors of the store {store.path}, layer {layer}, are identical: the store looks "
            "broken. Record it again, or train with --data.no-scale-norm."
        )
    return mean, math.sqrt(store.d_vit * n / m2)


def _stream_chunks(reader: ChunkReader, chunks, chunk_images, ipc: int, n_imgs: int, n_ahead: int = 2):
    """Yield (chunk, its images, chunk array) in order, reading up to n_ahead chunks ahead in a thread."""

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


def normalization(store: ActivationStore, data_cfg: config.DataLoad) -> tuple[np.ndarray, float]:
    """(mean [d_vit] float64, scale) for the SAE: x_n = (x - mean) * scale, as the flags of data_cfg ask.

    scale_mean and scale_norm: E||(x - mean) * scale||^2 = d_vit. No scale_mean: mean = 0 and E||x * scale||^2 =
    d_vit. No scale_norm: scale = 1. The raw statistics are computed once per (layer, token mode) and cached in the
    store (``stats/``); the uncentred scale follows from them, since E||x||^2 = E||x - mean||^2 + ||mean||^2.
    """
    check_token_mode(store, data_cfg.patches)
    d = store.d_vit
    if not data_cfg.scale_mean and not data_cfg.scale_norm:
        return np.zeros(d), 1.0
    cached = store.read_stats(data_cfg.layer, data_cfg.patches)
    if cached is None:
        mean, scale = compute_stats(store, data_cfg.layer, data_cfg.patches)
        n = int(usable_images(store).sum()) * vectors_per_image(store, data_cfg.patches)
        _cache_stats(store, data_cfg.layer, data_cfg.patches, mean, scale, n)
    else:
        mean, scale = cached
    if not data_cfg.scale_mean:
        mean, scale = np.zeros(d), math.sqrt(d / (d / scale**2 + float(mean @ mean)))
    return mean, scale if data_cfg.scale_norm else 1.0


def _cache_stats(store: ActivationStore, layer: int, patches: str, mean: np.ndarray, scale: float, n: int) -> None:
    try:
        store.write_stats(layer, patches, mean, scale, n)
        return
    except ValueError:  # opened read-only: open it again for writing
        pass
    try:
        ActivationStore.open(store.path, mode="r+").write_stats(layer, patches, mean, scale, n)
    except (OSError, ValueError) as err:
        warnings.warn(f"Could not cache the statistics of layer {layer} ({patches}) in {store.path}: {err}. "
                      "They will be computed again next time.", stacklevel=2)
