"""Every job's configuration, as frozen dataclasses.

One definition each: the tyro CLI, the pipeline file (TOML) and the Dagster layer all build these classes.
Field docstrings become the CLI's ``--help``.
"""

import dataclasses
import math
import numbers
import os
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]


# ----------------------------------------------------------------------------------------------------------------
# Range checks, run when a config is built (CLI, pipeline file, sweep, checkpoint header), so a bad number fails at
# once with its flag instead of deep inside torch or the data loader.
# ----------------------------------------------------------------------------------------------------------------

AT_LEAST_0 = ("at least 0", lambda v: v >= 0)
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
POSITIVE = ("a positive finite number", lambda v: v > 0)
ANY = ("a finite number", lambda v: True)
SEED = ("an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)

DENSE_FREQ = 1e-2
"""A latent that fires on more than this fraction of vectors is dense (``nn.metrics``' ``n_dense``, the report's
verdict, the explorer's class-selectivity order)."""

MIN_GAIN_VS_RANDOM = 0.25
"""How much less held-out error than the random-decoder control at the same L0 counts as structure found ([checks]
min_gain_vs_random). Trained SAEs beat random atoms by up to 13 % on isotropic Gaussian noise and by 40-89 % on planted
atoms (benchmarks/bench_planted.py, --null; docs/benchmarks.md)."""


def check_fields(cfg, prefix: str, rules: dict[str, tuple[str, object]]) -> None:
    """Raise UserError for the first field of ``cfg`` that is not a finite number satisfying its rule (None passes:
    it means "unset"; a tuple is checked element by element). ``prefix`` makes the CLI flag: ``--sae.`` + ``k``."""
    from saev_core.errors import UserError

    for name, (wanted, ok) in rules.items():
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is None:
                continue
            number = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if not (number and math.isfinite(v) and ok(v)):
                flag = prefix + name.replace("_", "-")
                rule = f"values each {wanted}" if isinstance(value, tuple) else wanted
                got = "" if number else f", not a {type(v).__name__}"
                raise UserError(
                    f"{flag} {value!r} must be {rule}{got} ({name}={value!r}). Pass a valid {flag} (in a pipeline "
                    f"file or checkpoint header: the key {name})."
                )


# ----------------------------------------------------------------------------------------------------------------
# Image sources (the ``data:...`` subcommands of ``activations``)
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Recording activations
# ----------------------------------------------------------------------------------------------------------------


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
                "n_imgs": AT_LEAST_1,
                "seed": SEED,
                "vit_layers": ANY,
            },
        )


# ----------------------------------------------------------------------------------------------------------------
# SAEs and training
# ----------------------------------------------------------------------------------------------------------------

SaeArch = Literal["relu", "relu-decnorm", "topk", "batchtopk", "jumprelu"]


@dataclasses.dataclass(frozen=True)
class SparseAutoencoderConfig:
    """One flat SAE config: ``arch`` picks the variant; fields a variant does not use are ignored by it."""

    d_vit: int = 1024
    """Input width: the ViT's residual-stream width."""
    exp_factor: int = 16
    """d_sae = d_vit * exp_factor."""
    arch: SaeArch = "relu"
    """relu (saev 0.1.0: L1, unit-norm decoder), relu-decnorm (L1 weighted by decoder norms), topk (+AuxK),
    batchtopk (global threshold at inference), jumprelu (straight-through threshold)."""
    sparsity_coeff: float = 4e-4
    """Weight of the sparsity penalty against the MSE averaged over batch and d_vit, as in saev 0.1.0 (so saev's
    values give saev's L0): L1 (relu), decoder-norm-weighted L1 (relu-decnorm) or L0 (jumprelu) per vector.
    Unused by topk and batchtopk. docs/training.md defines every loss term."""
    k: int = 32
    """Active latents per vector (topk, batchtopk)."""
    n_prefixes: int = 1
    """Matryoshka: number of nested prefixes (> 1 turns it on; topk and batchtopk only)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK dead-latent loss (topk, batchtopk)."""
    k_aux: int = 512
    """Dead latents used by AuxK."""
    dead_after_n_patches: int | None = None
    """A latent that has not fired in this many training patches is dead (AuxK's dead latents, and the count
    frac_dead_train). None: 10,000,000, or 10% of --n-patches when that is less (logged)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold (raw, not log)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the straight-through estimator's window."""
    decoder_init_norm: float = 0.1
    """Initial decoder row norm (relu-decnorm)."""
    seed: int = 0
    """Weight-initialisation seed; a sweep gives member i the seed base + i."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--sae.",
            {
                "d_vit": AT_LEAST_1,
                "exp_factor": AT_LEAST_1,
                "sparsity_coeff": AT_LEAST_0,
                "k": AT_LEAST_1,
                "n_prefixes": AT_LEAST_1,
                "auxk_alpha": AT_LEAST_0,
                "k_aux": AT_LEAST_1,
                "dead_after_n_patches": AT_LEAST_1,
                "jumprelu_init_threshold": ANY,
                "jumprelu_bandwidth": POSITIVE,
                "decoder_init_norm": POSITIVE,
                "seed": SEED,
            },
        )

    @property
    def d_sae(self) -> int:
        return self.d_vit * self.exp_factor


@dataclasses.dataclass(frozen=True)
class DataLoadConfig:
    """Which activations to train on and how to normalise them."""

    shard_root: str = "./shards"
    """Activation store path or URL (the last line `activations` prints)."""
    layer: int = -2
    """Layer to read, as recorded (-2) or resolved (10)."""
    patches: Literal["patches", "cls", "meanpool"] = "patches"
    """patches: every patch vector; cls: the CLS token; meanpool: the mean of an image's patches."""
    scale_mean: bool = True
    """Subtract the mean over all valid images of the layer (cached in the store, saved in every SAE checkpoint)."""
    scale_norm: bool = True
    """Scale so that E||x - mean||^2 = d_vit (stored like the mean)."""
    val_frac: float = 0.1
    """Fraction of images (not patches) held out for evaluation."""
    buffer_chunks: int = 32
    """Store chunks held in the shuffle buffer."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--data.",
            {
                "layer": ANY,
                "val_frac": ("in [0, 1)", lambda v: 0 <= v < 1),
                "buffer_chunks": AT_LEAST_1,
            },
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Train one SAE, or a sweep of SAEs in one pass over the data."""

    data: DataLoadConfig = dataclasses.field(default_factory=DataLoadConfig)
    """Which activations to train on (--data.*)."""
    sae: SparseAutoencoderConfig = dataclasses.field(default_factory=SparseAutoencoderConfig)
    """The SAE (--sae.*); a sweep varies these per member."""
    n_patches: int = 100_000_000
    """Training vectors to read (sae_batch_size per step; epochs over the store cycle as needed)."""
    sae_batch_size: int = 16_384
    """Vectors per SAE step."""
    lr: float | None = None
    """Peak learning rate. None: saev's 4e-4 for the default SAE and run (d_sae 16,384, 6,103 steps), times
    sqrt(16384 / d_sae) and (6103 / steps)^(1/4) for narrower SAEs and shorter runs, at most 1e-2 (logged)."""
    n_lr_warmup: int | None = None
    """Linear learning-rate warm-up steps (then linear decay to 0). None: 500, or 5% of the steps when that is less
    (logged)."""
    n_sparsity_warmup: int = 0
    """Linear sparsity-coefficient warm-up steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm per SAE)."""
    sweep: str | None = None
    """A TOML file of lists to sweep over ([sae], [data] tables and top-level keys)."""
    ckpt_path: str = "./checkpoints"
    """Where checkpoints go: <ckpt_path>/<member_id>/sae.pt."""
    ckpt_every: int = 1000
    """Steps between periodic checkpoints (for resuming)."""
    log_every: int = 50
    """Steps between metric logs."""
    device: Device = "auto"
    """Where the SAEs train: auto picks cuda when available."""
    n_threads: int | None = None
    """CPU threads for training: torch's intra-op threads during the run; the loader reads with at most 2 of them.
    None: the CPUs this process may use to begin with, one fewer (and so on) while the steps' own timing says it is
    faster, re-checked as the run goes (docs/training.md)."""
    sparse_topk: Literal["auto", "on", "off"] = "auto"
    """topk and batchtopk: train sparsely (only the encoder's forward is a dense matmul; same loss and gradients,
    docs/training.md): auto when k / d_sae <= 1/12, on, or off (the dense reference). Other archs ignore it."""
    seed: int = 42
    """Data-order seed and base of the SAE seeds."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--",
            {
                "n_patches": AT_LEAST_1,
                "sae_batch_size": AT_LEAST_1,
                "lr": POSITIVE,
                "n_lr_warmup": AT_LEAST_0,
                "n_sparsity_warmup": AT_LEAST_0,
                "max_grad_norm": ANY,
                "ckpt_every": AT_LEAST_1,
                "log_every": AT_LEAST_1,
                "n_threads": AT_LEAST_1,
                "seed": SEED,
            },
        )


# ----------------------------------------------------------------------------------------------------------------
# Top-k visuals
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VisualsDataConfig:
    """Which activations to run the SAE over; each field left unset comes from the checkpoint's provenance."""

    shard_root: str | None = None
    """Activation store path or URL (default: the store the SAE was trained on)."""
    layer: int | None = None
    """Layer, as recorded (-2) or resolved (10) (default: the SAE's)."""
    patches: Literal["patches", "cls"] | None = None
    """Rank images by their best patch (patches) or by their CLS token (cls) (default: the SAE's token mode)."""

    def __post_init__(self) -> None:
        check_fields(self, "--data.", {"layer": ANY})


@dataclasses.dataclass(frozen=True)
class VisualsConfig:
    """For every SAE latent, its top-k images as heatmaps, filtered to the interesting latents, in one gallery page."""

    ckpt: str = "./checkpoints/sae.pt"
    """SAE checkpoint (ours or saev 0.1.0's; the latter needs the --data.* flags)."""
    dump_to: str = "./visuals"
    """Output folder: cache/, neurons/<latent>/<rank>.png, index.html."""
    data: VisualsDataConfig = dataclasses.field(default_factory=VisualsDataConfig)
    """Which activations (--data.*); defaults to the checkpoint's provenance."""
    images: ImageFolderDataset | None = None
    """Where the images are now, when they moved since recording (images:image-folder-dataset --images.root DIR);
    must hold the same files (the store's image fingerprint)."""
    top_k: int = 128
    """Images kept per latent in the cache."""
    n_imgs_per_latent: int = 25
    """Images rendered per selected latent (at most top_k)."""
    log_freq_range: tuple[float, float] = (-6.0, -2.0)
    """Select latents whose log10 firing frequency is in [LOW, HIGH]."""
    log_value_range: tuple[float, float] = (-1.0, 1.0)
    """Select latents whose log10 mean value (when firing) is in [LOW, HIGH]."""
    include_latents: tuple[int, ...] = ()
    """Latents always rendered (unless dead), in addition to the random selection."""
    allow_layer_mismatch: bool = False
    """Render even when --data.layer is not the layer the SAE was trained on (refused by default: its latents mean
    nothing on another layer's activations)."""
    n_latents: int = 400
    """How many latents to pick at random among those that pass the filters."""
    seed: int = 42
    """Seed of the random selection."""
    probe: str | None = None
    """probe.json (`probe`) to show as the gallery's "patch probes" section; default: <checkpoint folder>/probes/
    probe.json when it exists (where the pipeline's [probe] stage writes it)."""
    device: Device = "auto"
    """Where the SAE runs: auto picks cuda when available."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--",
            {
                "top_k": AT_LEAST_1,
                "n_imgs_per_latent": AT_LEAST_1,
                "log_freq_range": ANY,
                "log_value_range": ANY,
                "include_latents": AT_LEAST_0,
                "n_latents": AT_LEAST_0,
                "seed": SEED,
            },
        )


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Splice-in fidelity of an SAE: the ViT's final image embedding with the SAE's layer replaced by its
    reconstruction, compared with zero and mean ablation, on the store's held-out images."""

    ckpt: str = "./checkpoints/sae.pt"
    """SAE checkpoint written by `train` (its provenance names the store, layer and ViT)."""
    max_images: int | None = 256
    """Held-out images to run the ViT on at most (a seeded sample beyond that; None: all)."""
    batch_size: int = 32
    """Images per ViT forward pass."""
    images_root: str | None = None
    """Where the store's images are now, when they moved since recording."""
    device: Device = "auto"
    """Where the ViT and the SAE run."""

    def __post_init__(self) -> None:
        check_fields(self, "--", {"max_images": AT_LEAST_1, "batch_size": AT_LEAST_1})


@dataclasses.dataclass(frozen=True)
class ExploreConfig:
    """A local web app (Gradio, bound to 127.0.0.1, no network) to browse latents, explain uploaded images and
    compare the members of a sweep."""

    visuals: str = "./visuals"
    """A visuals folder (`visuals --dump-to`): its cache/topk.npz is browsed without recomputation."""
    ckpt: str | None = None
    """The SAE of that folder, to explain uploaded images (default: the checkpoint its cache/selection.json
    names); it must be the SAE the cache was made from."""
    sweep: str | None = None
    """A sweep's checkpoint folder (`train --ckpt-path`, holding sweep.csv) to compare its members."""
    port: int = 7860
    """Port on 127.0.0.1 (0: any free port)."""
    device: Device = "auto"
    """Where the ViT and the SAE run for uploads."""

    def __post_init__(self) -> None:
        check_fields(self, "--", {"port": ("a port number in [0, 65535]", lambda v: 0 <= v <= 65535)})


# ----------------------------------------------------------------------------------------------------------------
# Patch probes
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProbeDataConfig:
    """Which labelled activations to probe; each field left unset comes from the checkpoint (its provenance, or the
    sweep.csv beside its folder)."""

    shard_root: str | None = None
    """Activation store path or URL, with per-patch labels (default: the store the SAE was trained on)."""
    layer: int | None = None
    """Layer, as recorded (-2) or resolved (10) (default: the SAE's)."""
    val_frac: float | None = None
    """The held-out fraction of images (default: the SAE's own, from its sweep.csv; else 0.1)."""
    seed: int | None = None
    """The split's seed (default: the SAE's data seed)."""

    def __post_init__(self) -> None:
        check_fields(self, "--data.", {"layer": ANY, "val_frac": ("in [0, 1)", lambda v: 0 <= v < 1), "seed": SEED})


PROBE_CONTROLS = ("pca", "random", "kmeans")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Patch probes (docs/probes.md): per class, the latent whose 1-D logistic probe fits its patches best on the
    training images, and its AP and Purity@k on the held-out images; mAP and Coverage; the same for controls."""

    ckpt: str = "./checkpoints/sae.pt"
    """SAE checkpoint written by `train` (its provenance names the store and layer)."""
    dump_to: str = "./probes"
    """Output folder: probe.json."""
    data: ProbeDataConfig = dataclasses.field(default_factory=ProbeDataConfig)
    """Which activations (--data.*); defaults to the checkpoint's."""
    k: int = 100
    """Purity@k: the held-out patches ranked highest by the best latent."""
    tau: float = 0.3
    """Coverage@tau: the AP a class's best latent must reach."""
    n_bins: int = 64
    """Value bins per latent (memory about 24 bytes x latents x bins x classes)."""
    controls: tuple[Literal["pca", "random", "kmeans"], ...] = PROBE_CONTROLS
    """Controls probed the same way: pca (principal directions), random (random decoder, TopK support), kmeans."""
    device: Device = "auto"
    """Where the SAE runs: auto picks cuda when available."""

    def __post_init__(self) -> None:
        check_fields(
            self,
            "--",
            {"k": AT_LEAST_1, "tau": ("in [0, 1]", lambda v: 0 <= v <= 1), "n_bins": ("at least 8", lambda v: v >= 8)},
        )


def resolve_device(device: Device) -> str:
    """auto -> cuda when available, else cpu. Imports torch lazily (Dagster imports this module)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from saev_core.errors import UserError

        raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here; pass --device cpu or auto.")
    return device


def available_memory(device: str) -> int | None:
    """Bytes a new allocation may use now: the free memory of a CUDA device, else the kernel's MemAvailable (RAM
    not needed by others, page cache included); None when it cannot be known."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def size_text(nbytes: float) -> str:
    """A byte count for people (GB, MB or kB)."""
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.2f} GB"
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def check_memory(nbytes: int, device: str, what: str, fix: str) -> None:
    """Refuse, before allocating, a job whose arrays (``what``, with how they were counted) would not fit in the
    memory ``device`` has free now: the estimate and what is available go in the message, as the recording's
    --dry-run prints them."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        from saev_core.errors import UserError

        raise UserError(f"{what} need about {size_text(nbytes)} but {device} has {size_text(free)} available. {fix}")


def cache_dir() -> str:
    """Where generated data lives: $SAEV_CACHE, else ~/.cache/saev."""
    return os.environ.get("SAEV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "saev")
