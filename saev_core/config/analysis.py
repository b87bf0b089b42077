"""The configs of the jobs that read a trained SAE: top-k visuals, splice-in evaluation, the explorer, patch
probes."""

import dataclasses
from typing import Literal

from saev_core.config.fields import ANY, AT_LEAST_0, AT_LEAST_1, SEED, check_fields
from saev_core.config.machine import Device
from saev_core.config.record import ImageFolderDataset


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
