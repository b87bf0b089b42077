"""The hot loop of recording: batches aligned to blocks -> recorder -> block buffers -> a background writer.

Batches never straddle blocks and always start at a block's first image, so a resumed run computes exactly the
same batches (and so exactly the same numbers) as an uninterrupted one. A background thread writes finished
blocks while the ViT works on the next one; on a GPU, each batch's copy to the host overlaps the next forward.
"""

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from saev_core import threads
from saev_core.record import segmentation
from saev_core.record.images import BAD_IMAGE
from saev_core.store import ActivationStore
from saev_core.store.metadata import Layout


@dataclasses.dataclass(frozen=True)
class RecordResult:
    """What a recording run did; the Dagster asset reports these fields as metadata."""

    path: str
    shape: tuple[int, int, int]
    layers: list[int]
    n_blocks_written: int
    n_imgs_written: int
    bytes_written: int
    seconds: float
    n_skipped: int

    @property
    def imgs_per_s(self) -> float:
        return self.n_imgs_written / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def combine(cls, parts: "list[RecordResult]", seconds: float) -> "RecordResult":
        """The parts of one store recorded side by side (``part=(i, n)``) as one result; seconds: the wall time
        from the first part's start to the last part's end."""
        if not parts or len({p.path for p in parts}) != 1:
            raise ValueError(f"parts of different stores (or none): {sorted({p.path for p in parts})}")
        return cls(
            path=parts[0].path,
            shape=parts[0].shape,
            layers=parts[0].layers,
            n_blocks_written=sum(p.n_blocks_written for p in parts),
            n_imgs_written=sum(p.n_imgs_written for p in parts),
            bytes_written=sum(p.bytes_written for p in parts),
            seconds=seconds,
            n_skipped=sum(p.n_skipped for p in parts),
        )


def block_batches(layout: Layout, blocks: list[int], batch_size: int) -> list[list[int]]:
    """Batches of image indices aligned to block starts, never straddling two blocks."""
    batches = []
    for block in blocks:
        start, end = layout.block_range(block)
        batches.extend(list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size))
    return batches


class BlockWriter:
    """Writes finished blocks on a background thread so the ViT never waits on the disk.

    At most one block waits in the queue: memory is at most three blocks (filling, waiting, writing).
    """

    def __init__(self, store: ActivationStore):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="saev-block-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_block(*item)
                except BaseException as err:  # re-raised on the main thread
                    self.error = err

    def put(self, block: int, acts: np.ndarray, valid: np.ndarray, patch_labels: np.ndarray | None = None) -> None:
        self._raise()
        self.queue.put((block, acts, valid, patch_labels))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


class HostCopier:
    """Moves each batch's activations to the host without stalling the GPU.

    On CUDA the copy goes asynchronously into one of two pinned staging buffers and is collected one batch later,
    after the next forward has been queued: the copy and the host-side work overlap the next batch's compute.
    On CPU it is a plain view."""

    def __init__(self, device: str, dtype: np.dtype):
        self.cuda = device.startswith("cuda")
        self.dtype = getattr(torch, np.dtype(dtype).name)
        self.staging: list = [None, None]
        self.turn = 0

    def start(self, acts) -> tuple:
        """acts [batch, n_layers, n_tokens, d_vit] on the device -> a handle for ``finish``."""
        acts = acts.transpose(0, 1).to(self.dtype)
        if not self.cuda:
            return acts, None
        k, self.turn = self.turn, 1 - self.turn
        if self.staging[k] is None or self.staging[k].shape != acts.shape:
            self.staging[k] = torch.empty(acts.shape, dtype=self.dtype, pin_memory=True)
        self.staging[k].copy_(acts, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return self.staging[k], event

    @staticmethod
    def finish(handle: tuple) -> np.ndarray:
        """The host array [n_layers, batch, n_tokens, d_vit] of a started copy (valid until two more starts)."""
        host, event = handle
        if event is not None:
            event.synchronize()
        return host.numpy()


class BlockBuffer:
    """One block's activations as they arrive, batch by batch; handed to the writer once its last image is in."""

    def __init__(self, store: ActivationStore, block: int, dtype: np.dtype, with_patch_labels: bool = False):
        self.block = block
        self.start, self.end = store.layout.block_range(block)
        self.acts = np.empty((len(store.layers), self.end - self.start, store.n_tokens, store.d_vit), dtype=dtype)
        """[n_layers, n_imgs_in_block, n_tokens, d_vit]"""
        self.valid = np.ones(self.end - self.start, dtype=bool)
        n_patches = store.metadata.n_patches_per_img
        self.patch_labels = np.zeros((self.end - self.start, n_patches), np.int16) if with_patch_labels else None
        """int16 [n_imgs_in_block, n_patches_per_img] for a store with patch labels, else None."""

    def put(self, index: np.ndarray, acts: np.ndarray, patch_labels: np.ndarray | None = None) -> None:
        """Place a batch's acts [n_layers, batch, n_tokens, d_vit] (and patch labels [batch, n_patches]) for the
        consecutive images ``index``."""
        rows = slice(int(index[0]) - self.start, int(index[-1]) + 1 - self.start)
        self.acts[:, rows] = acts
        if self.patch_labels is not None:
            self.patch_labels[rows] = patch_labels

    def mark_bad(self, image: int) -> None:
        """An image that failed to decode (or whose mask is bad): zero activations and labels, valid=False."""
        self.valid[image - self.start] = False
        self.acts[:, image - self.start] = 0
        if self.patch_labels is not None:
            self.patch_labels[image - self.start] = 0

    def is_full_after(self, index: np.ndarray) -> bool:
        return int(index[-1]) + 1 == self.end


@dataclasses.dataclass
class _InFlight:
    """A batch whose forward pass was queued and whose activations are still being copied to the host."""

    buffer: BlockBuffer
    index: np.ndarray
    labels: np.ndarray
    handle: tuple
    patch_labels: np.ndarray | None = None


def record_batches(
    store: ActivationStore,
    recorder,
    batches: Iterable,
    blocks: list[int],
    device: str,
    on_bad_image: Callable[[int], None] = lambda i: None,
    show_progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    on_bad_mask: Callable[[int], None] = lambda i: None,
    tuner: threads.ThreadTuner | None = None,
) -> RecordResult:
    """The hot loop: (pixels, index, label) batches aligned to ``blocks`` -> recorder -> block buffers -> writer.
    For a store with patch labels the batches are (pixels, index, label, patch_labels); a row of ``BAD_MASK``
    labels makes its image invalid after ``on_bad_mask(index)`` (which raises to stop instead).

    Each batch is finished (copied into its block buffer, bad images zeroed, a full block handed to the writer)
    one iteration late, so that on a GPU the next forward pass runs while the host does this work.
    An image whose label is BAD_IMAGE gets zero activations and valid=False after ``on_bad_image(index)``
    (which raises to stop instead). ``tuner`` (default: every usable CPU, timed on the CPU) sets torch's threads
    from the time of each batch, decoding waits included: the decoding workers share the cores."""
    tuner = tuner if tuner is not None else threads.tuner_for(None, device)
    dtype = np.dtype(store.metadata.dtype)
    n_todo = sum(end - start for start, end in map(store.layout.block_range, blocks))
    writer, copier = BlockWriter(store), HostCopier(device, dtype)
    with_labels = bool(store.patch_class_names)
    block_iter, buffer, in_flight = iter(blocks), None, None
    n_done = n_skipped = 0
    t0 = time.perf_counter()

    def finish(batch: _InFlight) -> None:
        nonlocal n_done, n_skipped
        batch.buffer.put(batch.index, copier.finish(batch.handle), batch.patch_labels)
        for i in batch.index[batch.labels == BAD_IMAGE].tolist():
            on_bad_image(i)
            batch.buffer.mark_bad(i)
            n_skipped += 1
        if batch.patch_labels is not None:
            for i in batch.index[(batch.patch_labels == segmentation.BAD_MASK).any(axis=1)].tolist():
                on_bad_mask(i)
                batch.buffer.mark_bad(i)
                n_skipped += 1
        if batch.buffer.is_full_after(batch.index):
            writer.put(batch.buffer.block, batch.buffer.acts, batch.buffer.valid, batch.buffer.patch_labels)
        n_done += len(batch.index)
        bar.update(len(batch.index))
        if on_progress is not None:
            on_progress(n_done, n_todo)

    try:
        with threads.apply(tuner), tqdm(total=n_todo, unit="img", desc="activations", disable=not show_progress) as bar:
            for pixels, index, labels, *patch_labels in batches:
                if with_labels and not patch_labels:
                    raise ValueError(f"{store.path} has patch labels but the batches bring none")
                if buffer is None or int(index[0]) >= buffer.end:
                    buffer = BlockBuffer(store, next(block_iter), dtype, with_labels)
                with torch.inference_mode():
                    _, acts = recorder(pixels.to(device, non_blocking=True))
                    handle = copier.start(acts)
                if in_flight is not None:
                    finish(in_flight)
                labels_of_batch = np.asarray(patch_labels[0]) if with_labels else None
                in_flight = _InFlight(buffer, np.asarray(index), np.asarray(labels), handle, labels_of_batch)
                tuner.step_done(len(index))
            tuner.settle()
            if in_flight is not None:
                finish(in_flight)
    finally:
        writer.close()
    n_layers, n_tokens, d_vit = len(store.layers), store.n_tokens, store.d_vit
    return RecordResult(
        path=store.path,
        shape=(store.n_imgs, n_tokens, d_vit),
        layers=store.layers,
        n_blocks_written=len(blocks),
        n_imgs_written=n_done,
        bytes_written=n_done * n_tokens * d_vit * n_layers * dtype.itemsize,
        seconds=time.perf_counter() - t0,
        n_skipped=n_skipped,
    )
