"""The configs of recording: the image sources (the ``data:...`` subcommands of ``activations``) and
``ActivationsConfig``."""

import dataclasses
from typing import Literal

from saev_core.config.fields import ANY, AT_LEAST_0, AT_LEAST_1, SEED, check_fields
from saev_core.config.machine import Device


@dataclasses.dataclass(frozen=True)
class ImageFolderDataset:
    """Images in a folder; the class of an image is its first sub-folder (images at the top level get class '')."""

    root: str = "./images"
    """Folder to read images from (searched recursively; files chosen by image extension, dotfiles ignored)."""
    skip_bad: bool = False
    """Skip files that fail to decode (they are recorded in the store) instead of stopping with an error."""


@dataclasses.dataclass(frozen=True)
class EmbeddedDataset:
    """The embedded default: >= 256 crops of the real photographs shipped inside scikit-image, scikit-learn and
    matplotlib, generated on first use into a cache folder."""

    cache_dir: str = ""
    """Where the generated images go; empty means $SAEV_CACHE/embedded or ~/.cache/saev/embedded."""
    n_imgs_per_photo: int = 16
    """Crops, scales and flips made per source photograph."""

    def __post_init__(self) -> None:
        check_fields(self, "--data.", {"n_imgs_per_photo": AT_LEAST_1})


@dataclasses.dataclass(frozen=True)
class SegFolderDataset:
    """Images with segmentation masks in ADE20K's layout: ROOT/images/<rel>.<ext> and ROOT/annotations/<rel>.png
    (same relative folder and stem; 8-bit class-index PNG, 0 = unlabelled), and an optional ROOT/classes.txt
    naming classes 1..C one per line. The store gets per-patch labels (docs/store-format.md)."""

    root: str = "./ade20k"
    """Folder holding images/, annotations/ and optionally classes.txt."""
    skip_bad: bool = False
    """Record images whose file or mask is bad as invalid (with a warning) instead of stopping with an error."""


@dataclasses.dataclass(frozen=True)
class EmbeddedSegDataset:
    """The embedded segmentation set: composites of textures cut from the embedded photographs pasted onto crops of
    others, with exact masks (docs/embedded-images.md), generated on first use into a cache folder."""

    cache_dir: str = ""
    """Where the generated images go; empty means $SAEV_CACHE/embedded-seg or ~/.cache/saev/embedded-seg."""
    n_imgs: int = 320
    """Composites to generate."""

    def __post_init__(self) -> None:
        check_fields(self, "--data.", {"n_imgs": AT_LEAST_1})


DatasetConfig = ImageFolderDataset | EmbeddedDataset | SegFolderDataset | EmbeddedSegDataset
SEG_DATASETS = (SegFolderDataset, EmbeddedSegDataset)
"""Image sources whose stores get per-patch labels."""


@dataclasses.dataclass(frozen=True)
class ActivationsConfig:
    """Record a ViT's residual-stream activations for chosen layers into a zarr activation store."""

    data: DatasetConfig = dataclasses.field(default_factory=EmbeddedDataset)
    """Which images to record."""
    vit_family: str = "clip"
    """ViT family: clip (open_clip), siglip (open_clip timm towers) or dinov2 (timm ViTs, registers allowed)."""
    vit_ckpt: str = "ViT-L-14/openai"
    """Checkpoint: 'ARCH/TAG' or 'ARCH/path/to/weights' for clip/siglip; 'TIMM_NAME' or 'TIMM_NAME/path' for dinov2."""
    d_vit: int | None = None
    """Residual-stream width of the ViT; checked against the model (None: take the model's)."""
    n_patches_per_img: int | None = None
    """Patches per image (e.g. 49 for ViT-B/32 at 224 px); checked against the model (None: take the model's)."""
    vit_layers: tuple[int, ...] = (-2,)
    """Which residual blocks to record (the block's output); negative counts from the end: -2 of 12 is block 10."""
    cls_token: bool = True
    """Record the CLS token as token 0 (not available for siglip: pass --no-cls-token)."""
    dump_to: str = "./shards"
    """Root folder (or fsspec URL) of activation stores; the store goes to <dump_to>/<key>."""
    n_patches_per_shard: int = 2_400_000
    """Patch vectors per shard (a shard is one block, written whole): images per shard =
    n_patches_per_shard // (n_layers * n_tokens), capped at the number of images and rounded down to a whole number
    of ~4 MB inner chunks. Recording holds up to three shards in memory."""
    vit_batch_size: int = 256
    """Images per ViT forward pass."""
    n_workers: int = 2
    """Image-decoding worker processes (0 decodes in the main process)."""
    n_threads: int | None = None
    """CPU threads of the ViT's forward pass (None: timed while it runs, as for training; docs/training.md)."""
    n_imgs: int | None = None
    """Record only the first N images of the source (None: all)."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage dtype; the ViT always computes in float32 on CPU."""
    device: Device = "auto"
    """Where the ViT runs: auto picks cuda when available."""
    seed: int = 42
    """Random seed (recorded in the store; recording itself is deterministic)."""
    dry_run: bool = False
    """Print the store's path and size and check the free disk space, then stop without recording."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--",
            {
                "d_vit": AT_LEAST_1,
                "n_patches_per_img": AT_LEAST_1,
                "n_patches_per_shard": AT_LEAST_1,
                "vit_batch_size": AT_LEAST_1,
                "n_workers": AT_LEAST_0,
                "n_threads": AT_LEAST_1,
                "n_imgs": AT_LEAST_1,
                "seed": SEED,
                "vit_layers": ANY,
            },
        )
