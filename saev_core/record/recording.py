"""The recording loop: image source -> ViT with hooks -> activation store, resumable.

Batches never straddle blocks and always start at a block's first image, so a resumed run computes exactly the
same batches (and so exactly the same numbers) as an uninterrupted one. A background thread writes finished
blocks while the ViT works on the next one.
"""

import contextlib
import dataclasses
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import absolute, check_output_folder, check_url, is_url, join, url_filesystem, write_error
from saev_core.record import checkpoints, images, segmentation
from saev_core.record import vit as vitlib
from saev_core.record.images import BAD_IMAGE
from saev_core.store import ActivationStore, open_if_created, stats
from saev_core.store.metadata import Layout, StoreMetadata

logger = logging.getLogger("saev_core.record.recording")


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


@dataclasses.dataclass(frozen=True)
class RecordingPlan:
    """Everything decided before any activation is computed: the dry run prints this."""

    path: str
    metadata: StoreMetadata

    @property
    def nbytes(self) -> int:
        return self.metadata.nbytes()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (recording holds up to three)."""
        m = self.metadata
        return m.layout.imgs_per_shard * m.n_tokens * m.d_vit * m.itemsize * len(m.layers)


def data_metadata(data: config.DatasetConfig) -> dict:
    """The image-source fields that decide the content (the cache location of the embedded set does not)."""
    if isinstance(data, config.EmbeddedDataset):
        return {"kind": "embedded-dataset", "n_imgs_per_photo": data.n_imgs_per_photo}
    if isinstance(data, config.EmbeddedSegDataset):
        return {"kind": "embedded-seg-dataset", "n_imgs": data.n_imgs}
    if isinstance(data, config.SegFolderDataset):
        return {"kind": "seg-folder-dataset", "root": data.root, "skip_bad": data.skip_bad}
    return {"kind": "image-folder-dataset", "root": data.root, "skip_bad": data.skip_bad}


def fingerprints(cfg: config.ActivationsConfig, source) -> dict[str, str]:
    """Content fingerprints of the checkpoint file and of the image list, and for a segmentation source of its
    patch labels (masks, classes, rule): part of the store key (the Dagster sources report the first two, through
    saev_core.pipeline, as data versions; the image list's covers the masks too)."""
    prints = {
        "vit_ckpt": vitlib.checkpoint_fingerprint(cfg.vit_family, cfg.vit_ckpt),
        "images": images.image_list_fingerprint(source),
    }
    labels_print = source.patch_labels_fingerprint()
    if labels_print is not None:
        prints["patch_labels"] = labels_print
    return prints


def plan_recording(cfg: config.ActivationsConfig, vit, recorder, source) -> RecordingPlan:
    metadata = StoreMetadata(
        vit_family=cfg.vit_family,
        vit_ckpt=cfg.vit_ckpt,
        d_vit=vit.d_vit,
        layers=tuple(cfg.vit_layers),
        resolved_layers=tuple(recorder.resolved_layers),
        n_blocks_in_vit=vit.n_blocks,
        n_patches_per_img=recorder.n_patches_per_img,
        cls_token=recorder.cls_token,
        n_imgs=len(source),
        n_patches_per_shard=cfg.n_patches_per_shard,
        data=data_metadata(cfg.data),
        image_root=absolute(source.root),
        seed=cfg.seed,
        dtype=cfg.dtype,
        fingerprints=fingerprints(cfg, source),
    )
    return RecordingPlan(path=join(absolute(cfg.dump_to), metadata.key), metadata=metadata)


def check_disk_space(root: str, nbytes: int) -> None:
    """Refuse to start when the disk under a local --dump-to lacks the room."""
    if is_url(root):
        return
    probe = absolute(root)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < nbytes:
        raise UserError(
            f"The store needs {_size(nbytes)} but {probe} (--dump-to {root}) has {_size(free)} free. Free some "
            "space, pass another --dump-to, record fewer --vit-layers or images (--n-imgs), or use --dtype float16."
        )


def _size(nbytes: int) -> str:
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


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


def record_activations(
    cfg: config.ActivationsConfig,
    show_progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    part: tuple[int, int] | None = None,
) -> RecordResult:
    """Record cfg.vit_layers of the ViT for every image of cfg.data into <dump_to>/<key>; resumable.

    on_progress(done, total) is called after every batch (Dagster logs it; the CLI shows a tqdm bar).
    part = (i, n): record only the i-th of n contiguous, disjoint block ranges (``block_part``), so n workers can
    fill one store side by side (one writer per block); create the store first (``create_store``)."""
    recorder, source, plan = prepare(cfg, with_transform=True)
    fresh = open_if_created(plan.path) is None
    dump_to_existed = is_url(cfg.dump_to) or os.path.exists(cfg.dump_to)
    store = None
    try:
        store = _create(cfg, plan, source)
        missing = store.missing_blocks()
        if part is not None:
            mine = set(block_part(store.layout.n_blocks, *part))
            missing = [b for b in missing if b in mine]
        for path in store.remove_stale_partials(missing, everything=part is None):
            logger.info("removed %s, left by an interrupted write", path)
        return _record_into(cfg, store, recorder, source, missing, show_progress, on_progress)
    except BaseException as err:
        if fresh and part is None and not _any_block_written(store):
            _remove_store(plan.path, None if dump_to_existed else absolute(cfg.dump_to))
        if isinstance(err, OSError):
            raise write_error(plan.path, err) from None
        raise


def _any_block_written(store: ActivationStore | None) -> bool:
    try:
        return store is not None and bool(store.completed_blocks().any())
    except Exception:  # the store cannot even be read back: nothing in it to keep
        return False


def _remove_store(path: str, empty_parent: str | None) -> None:
    """Remove a store that failed before its first block (nothing in it worth keeping), and the --dump-to folder
    this run created for it when nothing else is in it."""
    if is_url(path):
        with contextlib.suppress(Exception):
            fs, root = url_filesystem(path)
            fs.rm(root, recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)
    if empty_parent is not None:
        with contextlib.suppress(OSError):
            os.rmdir(empty_parent)


def _record_into(cfg, store, recorder, source, missing, show_progress, on_progress) -> RecordResult:
    device = config.resolve_device(cfg.device)
    batches = block_batches(store.layout, missing, cfg.vit_batch_size)
    seg = isinstance(source, segmentation.SegImageSource)
    dataset = source.with_patch_labels(segmentation.patch_grid(recorder.n_patches_per_img)) if seg else source
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=cfg.n_workers, pin_memory=device == "cuda"
    )
    skip_bad = getattr(cfg.data, "skip_bad", False)
    logger.info("recording %d images (%d blocks) into %s", sum(map(len, batches)), len(missing), store.path)

    def on_bad_image(i: int) -> None:
        reason = source.decode_error(i)
        if not skip_bad:
            raise UserError(
                f"Cannot decode image {source.paths[i]!r} (index {i}) in {source.root}: {reason}. Fix or remove "
                "the file, or pass --data.skip-bad to skip bad files (they are recorded as invalid in the store)."
            )
        logger.warning("skipping undecodable image %s: %s", source.paths[i], reason)

    def on_bad_mask(i: int) -> None:
        reason = source.mask_error(i) or f"the mask {source.mask_abspath(i)} failed to give labels"
        if not skip_bad:
            raise UserError(
                f"{reason}. Fix or remove it, or pass --data.skip-bad to record its image as invalid "
                "(zero activations, no patch labels)."
            )
        logger.warning("skipping image %s: %s", source.paths[i], reason)

    result = record_batches(
        store,
        recorder.to(device).eval(),
        loader,
        missing,
        device,
        on_bad_image,
        show_progress,
        on_progress,
        on_bad_mask=on_bad_mask,
    )
    if store.is_complete:  # the last writer writes the statistics (a fan-out part may finish before the others)
        stats.write_store_stats(store)
    return result


def block_part(n_blocks: int, i: int, n: int) -> list[int]:
    """The i-th of n contiguous, disjoint ranges of blocks that together cover all n_blocks (sizes differ by <= 1)."""
    if not 0 <= i < n:
        raise ValueError(f"part {i} of {n} does not exist")
    return [int(b) for b in np.array_split(np.arange(n_blocks), n)[i]]


def create_store(cfg: config.ActivationsConfig) -> str:
    """Plan and create the store of cfg without recording anything (before fanning out to workers); its path."""
    _, source, plan = prepare(cfg, with_transform=False)
    return _create(cfg, plan, source).path


def _create(cfg: config.ActivationsConfig, plan: RecordingPlan, source: images.ImageSource) -> ActivationStore:
    """Create (or reopen) the planned store, with a patch-label array for a segmentation source."""
    patch_class_names = source.patch_class_names if isinstance(source, segmentation.SegImageSource) else None
    return ActivationStore.create(
        absolute(cfg.dump_to),
        plan.metadata,
        source.paths,
        source.labels,
        source.class_names,
        patch_class_names=patch_class_names,
    )


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
) -> RecordResult:
    """The hot loop: (pixels, index, label) batches aligned to ``blocks`` -> recorder -> block buffers -> writer.
    For a store with patch labels the batches are (pixels, index, label, patch_labels); a row of ``BAD_MASK``
    labels makes its image invalid after ``on_bad_mask(index)`` (which raises to stop instead).

    Each batch is finished (copied into its block buffer, bad images zeroed, a full block handed to the writer)
    one iteration late, so that on a GPU the next forward pass runs while the host does this work.
    An image whose label is BAD_IMAGE gets zero activations and valid=False after ``on_bad_image(index)``
    (which raises to stop instead)."""
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
        with tqdm(total=n_todo, unit="img", desc="activations", disable=not show_progress) as bar:
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


def prepare(cfg: config.ActivationsConfig, with_transform: bool):
    """Build the recorder and the image source and plan the store; every input check happens here, before any
    store exists, so bad input never leaves a store behind."""
    if cfg.vit_batch_size < 1:
        raise UserError(f"--vit-batch-size {cfg.vit_batch_size} must be at least 1.")
    check_url(cfg.dump_to, "--dump-to")
    check_output_folder(cfg.dump_to, "--dump-to")

    checkpoints.parse_ckpt(cfg.vit_family, cfg.vit_ckpt)  # a missing weights file: its UserError, before any work
    transform = vitlib.make_img_transform(cfg.vit_family, cfg.vit_ckpt) if with_transform else None
    source = images.make_image_source(cfg.data, transform, cfg.n_imgs)  # before the model: image errors fail fast
    vit = vitlib.make_vit(cfg.vit_family, cfg.vit_ckpt)
    vitlib.check_d_vit(vit, cfg.d_vit)
    recorder = vitlib.RecordedVisionTransformer(
        vit, cfg.n_patches_per_img or vit.n_patches_per_img, cfg.cls_token, list(cfg.vit_layers)
    )
    if isinstance(source, segmentation.SegImageSource):  # masks must map onto the patch grid
        grid = segmentation.patch_grid(recorder.n_patches_per_img)
        segmentation.check_grid(vitlib.make_img_transform(cfg.vit_family, cfg.vit_ckpt), grid)
    plan = plan_recording(cfg, vit, recorder, source)
    existing = open_if_created(plan.path)
    missing = plan.nbytes if existing is None else existing.missing_bytes()
    check_disk_space(cfg.dump_to, missing)  # a resumed store needs room for its missing blocks only
    config.check_memory(
        3 * plan.block_bytes,
        "cpu",
        f"--n-patches-per-shard {cfg.n_patches_per_shard}: recording's 3 blocks in memory (filling, waiting, writing; "
        f"{plan.metadata.layout.imgs_per_shard} images x {plan.metadata.n_tokens} tokens x {plan.metadata.d_vit} x "
        f"{plan.metadata.itemsize} bytes x {len(plan.metadata.layers)} layers each)",
        "Lower --n-patches-per-shard or record fewer --vit-layers at once.",
    )
    vitlib.check_forward_memory(
        cfg.vit_batch_size,
        plan.metadata.n_tokens,
        plan.metadata.d_vit,
        config.resolve_device(cfg.device),
        "--vit-batch-size",
    )
    return recorder, source, plan


def dry_run(cfg: config.ActivationsConfig) -> RecordingPlan:
    """Plan the store without recording: path, size, and whether the disk has room (raises when not)."""
    return prepare(cfg, with_transform=False)[2]
