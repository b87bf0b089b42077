"""Shuffled batches of activation vectors from one layer of an activation store, for SAE training.

Vectors are raw activations (float32) of a token mode (``saev_core.store.tokens``); the SAE normalises them itself
with the statistics from ``saev_core.store.stats.normalization``.

**Train/val split** (``split_images``). Whole images are held out, never single patches: exactly
``round(val_frac * n_valid)`` valid images (at least one when ``val_frac > 0``, never all of them). They are taken
a whole *unit* at a time, units drawn in a random order seeded by ``seed``; the last unit drawn gives only the
images still needed (its first ones). A unit is an inner chunk (``imgs_per_chunk`` images) when the held-out split
fills at least ``MIN_VAL_UNITS`` chunks, so every chunk but at most one belongs entirely to one split and reads stay
chunk-aligned; in smaller stores it is ``n_val // MIN_VAL_UNITS`` images (at least one), so the held-out split
comes from at least that many places in the store instead of one or two chunks: image folders list one class (or
one photograph) after another, and two chunks of them are not a fair sample. Chunks holding images of both splits
are read by both, each keeping its own. Invalid images (failed to decode) are in neither split. A store with
unwritten blocks is refused.

**Order of one epoch** (a pure function of ``seed`` and ``epoch``): the split's chunks are permuted by
``np.random.default_rng([ORDER_STREAM, seed, epoch])``; consecutive groups of ``buffer_chunks`` chunks form windows;
each window's vectors are permuted by ``default_rng([WINDOW_STREAM, seed, epoch, window index])`` (the split uses
``[SPLIT_STREAM, seed]``; the tags keep the three streams apart); the concatenation of the permuted windows is cut
into batches of ``batch_size``. Batches run on across window boundaries, and the last batch of an epoch is yielded
short (every vector is seen exactly once per epoch; ``len(loader)`` counts it). Resuming at ``n_vectors_done``
skips the windows before it without reading them and yields exactly the batches an uninterrupted run would.

**Reading.** A producer thread reads whole chunks (``imgs_per_chunk`` images; ``shards.ChunkReader``) with a small
thread pool, reading the next window while it hands out the batches of the current one through a bounded queue; an
exception there is raised again in the consumer. The window's permutation is applied while reading, not after: each
vector is read straight into its row of its batch (a scatter read, ``shards.Scatter``), so a batch costs one copy of
its bytes, as a sequential read does. A float16 store is read the same way into float16 batch arrays, each converted
to float32 (exactly: every float16 value is a float32 value) as it is handed out. Token modes that compute
(``meanpool``) read the chunk whole and place the vectors with numpy; stores the raw path cannot read (other codecs,
fsspec URLs) go through zarr into the same rows. Batches are handed out as views of arrays the loader reuses once
nothing refers to a batch any more (no tensor, slice or view of it left), so a batch stays valid for as long as the
consumer keeps it.

Normalisation statistics live in ``saev_core.store.stats``; token modes in ``saev_core.store.tokens``.
"""

import collections
import concurrent.futures
import contextlib
import itertools
import math
import queue
import threading
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
from jaxtyping import Float

from saev_core import config
from saev_core.errors import UserError
from saev_core.store import ActivationStore
from saev_core.store.shards import ChunkReader, Scatter
from saev_core.store.tokens import check_token_mode, first_patch, vectors, vectors_per_image

# The shuffle contract's stream tags (public: other programs and the tests rebuild the order from them). Every random
# stream gets its own tag and a key of fixed length: numpy's SeedSequence treats [a, b] and [a, b, 0] alike, so keys
# of different purposes must not differ only by trailing zeros.
SPLIT_STREAM, ORDER_STREAM, WINDOW_STREAM = 1, 2, 3
MIN_VAL_UNITS = 16
"""The held-out split comes from at least this many places in the store (whole chunks in large stores)."""
FLOAT32 = np.dtype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------


def split_images(store: ActivationStore, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) image indices, sorted, int64. See the module docstring for how whole chunks are held out."""
    if not 0.0 <= val_frac < 1.0:
        raise UserError(
            f"--data.val-frac {val_frac} is outside [0, 1). Pass the fraction of images to hold out, e.g. 0.1."
        )
    _check_seed(seed)
    valid = store.usable_images()
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise UserError(
            f"Every image of the store {store.path} is marked invalid (failed to decode); there is "
            "nothing to train on. Check the image folder and record again."
        )
    n_val = min(n_valid - 1, max(int(val_frac > 0), round(val_frac * n_valid)))
    unit, n_imgs = split_unit(store.layout.imgs_per_chunk, n_val), store.n_imgs
    is_val = np.zeros(n_imgs, dtype=bool)
    need = n_val
    for c in np.random.default_rng([SPLIT_STREAM, seed]).permutation(math.ceil(n_imgs / unit)):
        if need == 0:
            break
        imgs = c * unit + np.flatnonzero(valid[c * unit : (c + 1) * unit])
        is_val[imgs[:need]] = True
        need -= len(imgs[:need])
    return np.flatnonzero(valid & ~is_val), np.flatnonzero(is_val)


def split_unit(imgs_per_chunk: int, n_val: int) -> int:
    """Images held out together: a whole chunk, or fewer when the held-out split would fill under MIN_VAL_UNITS
    chunks (see the module docstring)."""
    return imgs_per_chunk if n_val >= MIN_VAL_UNITS * imgs_per_chunk else max(1, n_val // MIN_VAL_UNITS)


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise UserError(f"--seed {seed} is negative; pass a seed >= 0.")


# ----------------------------------------------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """The consumer went away; the producer unwinds."""


class _BatchPool:
    """Batch arrays [batch_size, d] for reuse. Each batch is handed out as a view of its array; the array is taken
    again only once that view is gone, i.e. no tensor, slice or numpy view of the batch is left anywhere. Fresh
    arrays cost page faults: reading into them ran at 7.6 GB/s here (2.5 GB/s into memory the process had never
    touched), into reused ones at 13 GB/s."""

    def __init__(self, shape: tuple[int, int], keep: int, dtype: np.dtype = FLOAT32):
        self.shape, self.keep, self.dtype = shape, keep, np.dtype(dtype)
        self._free: list[np.ndarray] = []
        self._lent: collections.deque = collections.deque()  # (array, weak reference to the view handed out)

    def take(self) -> np.ndarray:
        self._collect()
        return self._free.pop() if self._free else np.empty(self.shape, self.dtype)

    def lend(self, arr: np.ndarray, view: np.ndarray) -> None:
        self._lent.append((arr, weakref.ref(view)))
        if len(self._lent) > self.keep:
            self._collect()
            if len(self._lent) > self.keep:  # a consumer that keeps its batches keeps their memory: forget the oldest
                self._lent.popleft()

    def _collect(self) -> None:
        """Move the arrays whose batches are gone to the free list."""
        for _ in range(len(self._lent)):
            arr, view = self._lent.popleft()
            if view() is None:
                self._free.append(arr)
            else:
                self._lent.append((arr, view))

    def give_back(self, arr: np.ndarray) -> None:
        self._free.append(arr)


class _Batches:
    """The rest of an epoch, ``n`` vectors, as consecutive batches of ``size``: stream position p is row p % size of
    batch p // size. The producer thread makes the arrays of a range of positions (``prepare``) before reads into
    them start, and hands out each batch once every read into it has finished (``emit_until``); reads (any thread)
    only write rows.

    Reads go into arrays of ``staging`` (by default ``pool`` itself, float32). A float16 store is read into float16
    staging arrays, so each vector is still read straight into its row, and a batch is converted to float32 (exactly)
    into an array of ``pool`` as it is handed out: one pass over the batch, while the next window is being read."""

    def __init__(self, n: int, size: int, pool: _BatchPool, staging: _BatchPool | None = None):
        self.n, self.size, self.pool = n, size, pool
        self.staging = pool if staging is None else staging
        self.dtype = self.staging.dtype
        self.row_bytes = pool.shape[1] * self.dtype.itemsize
        self._arrays: dict[int, np.ndarray] = {}
        self._address = np.zeros(math.ceil(n / size), np.int64)  # of each batch array being filled
        self._next = 0  # the first batch not handed out yet

    def prepare(self, lo: int, hi: int) -> None:
        for b in range(max(lo, 0) // self.size, math.ceil(min(hi, self.n) / self.size)):
            if b not in self._arrays:
                self._arrays[b] = self.staging.take()
                self._address[b] = self._arrays[b].ctypes.data

    def iovecs(self, pos: np.ndarray, junk: np.ndarray) -> np.ndarray:
        """[len(pos), 2] uint64 (address, length) of the row of each position (negative: of junk); for preadv."""
        batch, row = np.divmod(pos, self.size)
        iovecs = np.empty((len(pos), 2), np.int64)
        address = self._address[np.maximum(batch, 0)] + row * self.row_bytes
        iovecs[:, 0] = np.where(pos >= 0, address, junk.ctypes.data)
        iovecs[:, 1] = self.row_bytes
        return iovecs.view(np.uint64)

    def put(self, pos: np.ndarray, vectors: np.ndarray) -> None:
        """Write vectors[i] at position pos[i] (negative: dropped)."""
        keep = np.flatnonzero(pos >= 0)
        batch, row = np.divmod(pos[keep], self.size)
        for b in np.unique(batch):
            here = batch == b
            self._arrays[int(b)][row[here]] = vectors[keep[here]]

    def emit_until(self, end: int, emit: Callable[[np.ndarray], None]) -> None:
        """Hand out, in order, every batch that lies below position ``end`` (the last one once end reaches n)."""
        while self._next * self.size < self.n and min((self._next + 1) * self.size, self.n) <= end:
            arr = self._arrays.pop(self._next)
            rows = min(self.size, self.n - self._next * self.size)
            if self.staging is not self.pool:
                out = self.pool.take()
                _widen(out[:rows], arr[:rows])
                self.staging.give_back(arr)
                arr = out
            view = arr[:rows]
            self.pool.lend(arr, view)
            self._next += 1
            emit(view)

    def give_back(self) -> None:
        """Return the arrays of batches never handed out (the iteration stopped early) to their pool."""
        for arr in self._arrays.values():
            self.staging.give_back(arr)
        self._arrays.clear()


_SERIAL_ELEMENTS = 32_767
"""Elements per piece of a float16 -> float32 conversion: below torch's grain size (32,768), so one thread does it."""


def _widen(dest: np.ndarray, src: np.ndarray) -> None:
    """dest[...] = src, rows [n, d] float16 -> float32 (exact), on the calling thread only.

    torch's cast uses the CPU's float16 instructions (~5 G values/s on one core here; numpy's ran at 0.6). Done
    whole, torch spreads one cast over its intra-op threads, which here fought the read threads and the consumer for
    the cores (27 ms per 16,384 x 768 batch inside the loader, vs 10 ms in pieces); in pieces it stays on the
    producer thread, which has nothing else to do while the next window is read."""
    step = max(1, _SERIAL_ELEMENTS // max(1, dest.shape[1]))
    to, frm = torch.from_numpy(dest), torch.from_numpy(src)
    for i in range(0, len(dest), step):
        to[i : i + step].copy_(frm[i : i + step])


class ActivationLoader:
    """Shuffled float32 batches [batch, d_vit] of one split of one store layer; iterate once per epoch.

    ``epoch`` and ``n_vectors_done`` say where the next iteration starts; they advance as batches are handed out,
    and after the last batch of an epoch they read (epoch + 1, 0), so ``for batch in loader`` runs the next epoch.
    ``state_dict()``/``load_state_dict()`` save and restore them.
    """

    def __init__(
        self,
        store: ActivationStore,
        data_cfg: config.DataLoadConfig,
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
        self._first_patch = first_patch(store)
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
        self._tokens = (
            np.arange(self._first_patch, store.n_tokens) if self.patches == "patches" else np.zeros(1, dtype=np.int64)
        )  # the tokens an image's vectors are, in meanpool its mean's
        # Patches and CLS vectors are read straight into their batch rows (float16 ones into float16 staging rows,
        # converted as a batch goes out); meanpool computes, in float32.
        self._direct = self.patches != "meanpool" and self._arr.dtype in (np.float32, np.float16)
        # Batch arrays worth tracking for reuse: two windows' worth being read, the queue, the one the producer is
        # putting, and two in the consumer's hands.
        window_batches = math.ceil(data_cfg.buffer_chunks * ipc * self._vpi / batch_size) + 1
        self._pool = _BatchPool((batch_size, store.d_vit), keep=2 * window_batches + self.prefetch_batches + 3)
        self._staging = (
            _BatchPool((batch_size, store.d_vit), keep=0, dtype=self._arr.dtype)
            if self._direct and self._arr.dtype != np.float32
            else None
        )
        """float16 arrays the reads of a float16 store go to; None: reads go to the batches themselves."""

        self.epoch = epoch
        self.n_vectors_done = 0
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
            target=self._run_producer,
            args=(self.epoch, self.n_vectors_done, items, stop),
            name="saev-loader",
            daemon=True,
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

    def first_batches(self, n: int) -> list[Float[torch.Tensor, "_batch d_vit"]]:
        """The first ``n`` batches of the rest of the current epoch (a sample for calibration and controls); the
        reading stops there."""
        with contextlib.closing(iter(self)) as stream:
            return list(itertools.islice(stream, n))

    def windows(self, epoch: int) -> list[np.ndarray]:
        """The epoch's windows: arrays of indices into the split's chunks, in reading order."""
        order = np.random.default_rng([ORDER_STREAM, self.seed, epoch]).permutation(len(self._chunks))
        step = self.data_cfg.buffer_chunks
        return [order[i : i + step] for i in range(0, len(order), step)]

    def _produce(self, epoch: int, start: int, emit: Callable[[np.ndarray], None]) -> None:
        windows = self.windows(epoch)
        sizes = np.array([self._counts[w].sum() for w in windows])
        ends = np.cumsum(sizes) - start  # stream positions from the resume point: earlier windows end at <= 0
        first = int(np.searchsorted(ends, 0, side="right"))  # windows before it were consumed: never read
        batches = _Batches(self.n_vectors - start, self.batch_size, self._pool, self._staging)
        pending: collections.deque = collections.deque()  # (end position, futures) of the windows being read
        try:
            with concurrent.futures.ThreadPoolExecutor(self.n_read_threads, thread_name_prefix="saev-read") as pool:
                try:
                    for w in range(first, len(windows)):
                        futures = self._read_window(pool, epoch, w, windows[w], int(ends[w] - sizes[w]), batches)
                        pending.append((int(ends[w]), futures))
                        if len(pending) == 2:  # one window is read ahead while the batches of the other go out
                            self._hand_out(*pending.popleft(), batches, emit)
                    while pending:
                        self._hand_out(*pending.popleft(), batches, emit)
                finally:
                    for _, futures in pending:
                        for future in futures:
                            future.cancel()
        finally:  # the executor has waited for every read: nothing writes into the batches any more
            batches.give_back()

    @staticmethod
    def _hand_out(end: int, futures: list, batches: _Batches, emit: Callable[[np.ndarray], None]) -> None:
        for future in futures:
            future.result()
        batches.emit_until(end, emit)

    def _read_window(self, pool, epoch: int, w: int, window: np.ndarray, base: int, batches: _Batches) -> list:
        """Start reading window w (its vectors at stream positions base.. after the shuffle); return the futures.

        The window's vectors, chunk after chunk in window order, then image and token order, are permuted: vector i
        lands at window position inv[i], where perm[inv[i]] = i, which is position base + inv[i] of the stream.
        """
        counts = self._counts[window]
        perm = np.random.default_rng([WINDOW_STREAM, self.seed, epoch, w]).permutation(int(counts.sum()))
        pos = np.empty_like(perm)
        pos[perm] = np.arange(base, base + len(perm))
        batches.prepare(base, base + len(perm))
        return [
            pool.submit(self._read_chunk, int(k), chunk_pos, batches)
            for k, chunk_pos in zip(window, np.split(pos, np.cumsum(counts)[:-1]))
        ]

    def _read_chunk(self, k: int, pos: np.ndarray, batches: _Batches) -> None:
        """Read chunk k, the vectors of its split images going to stream positions pos (negative: skipped)."""
        start = int(self._chunks[k]) * self.store.layout.imgs_per_chunk
        n, local = int(self._chunk_imgs[k]), self._local[k]
        pos = pos.reshape(len(local), self._vpi)
        if self._direct:  # the position of every token of the chunk's images
            grid = np.full((n, self.store.n_tokens), -1, np.int64)
            grid[local[:, None], self._tokens[None, :]] = pos
            self._reader.read(start, Scatter(grid, batches))
            return
        grid = np.full((n, self._vpi), -1, np.int64)  # the position of every vector of the chunk's images
        grid[local] = pos
        x = np.empty((n, self.store.n_tokens, self.store.d_vit), self._arr.dtype)
        self._reader.read(start, x)
        batches.put(grid.ravel(), vectors(x, self.patches, self._first_patch))
