"""Everything a recording decides before computing any activation: the store's metadata and key (``RecordingPlan``),
and every input check (images, checkpoint, patch grid, disk space, memory), so bad input never leaves a store
behind. ``dry_run`` stops here."""

import dataclasses
import os
import shutil

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import absolute, check_output_folder, check_url, is_url, join
from saev_core.record import checkpoints, images, segmentation
from saev_core.record import vit as vitlib
from saev_core.store import open_if_created
from saev_core.store.metadata import StoreMetadata


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
            f"The store needs {config.size_text(nbytes)} but {probe} (--dump-to {root}) has {config.size_text(free)} "
            "free. Free some space, pass another --dump-to, record fewer --vit-layers or images (--n-imgs), or use "
            "--dtype float16."
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
