"""The recording run: image source -> ViT with hooks -> activation store, resumable, optionally in parts.

What is decided before any activation is computed lives in ``planning`` (``prepare``, ``dry_run``); the loop over
batches and blocks in ``hot_loop`` (``record_batches``). This module creates or reopens the store, picks the
blocks still missing (of this part), runs the loop, and removes a store that failed before its first block.
"""

import contextlib
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch

from saev_core import config, threads
from saev_core.errors import UserError
from saev_core.files import absolute, is_url, url_filesystem, write_error
from saev_core.record import images, segmentation
from saev_core.record.hot_loop import RecordResult, block_batches, record_batches
from saev_core.record.planning import RecordingPlan, dry_run, prepare
from saev_core.store import ActivationStore, open_if_created, stats

logger = logging.getLogger("saev_core.record.recording")

__all__ = ["RecordResult", "RecordingPlan", "block_part", "create_store", "dry_run", "record_activations"]


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
        tuner=threads.tuner_for(cfg.n_threads, device),
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
