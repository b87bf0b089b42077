"""Splice-in fidelity: what the ViT loses when one layer's residual stream is replaced by an SAE's reconstruction.

For each held-out image of the store (the loader's image-level split, so the SAE never trained on these images) the
ViT runs four times: untouched, with layer L's tokens replaced by ``x_hat`` (a forward hook on block L), by zeros,
and by the data mean. Each pass's final image embedding (open_clip's projected embedding, timm's pooled features) is
compared with the untouched one by cosine similarity, averaged over images:

    cos_sae, cos_zero, cos_mean                 (1 = the embedding is unchanged)
    gap_recovered      = (cos_sae - cos_zero) / (1 - cos_zero)     1: as good as the real layer, 0: as bad as zeros
    gap_recovered_mean = (cos_sae - cos_mean) / (1 - cos_mean)     the same against mean ablation (a tighter bound)

Only the tokens the SAE was trained on are replaced: the patch tokens (``patches``) or the CLS token (``cls``);
CLS and register tokens are left as they were for ``patches``. When the ablation itself changes nothing (for
example patch tokens of the last block under CLS pooling) the gap is 0 and ``gap_recovered`` is NaN.
The ViT's untouched, zero and mean passes are shared by every SAE of one (store, layer, token mode):
``SpliceEvaluator`` runs them once and then one pass per SAE.
"""

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config, nn, threads
from saev_core.errors import UserError
from saev_core.files import read_json
from saev_core.record import images as imagelib
from saev_core.record import vit as vitlib
from saev_core.store import ActivationStore, loader, stats

logger = logging.getLogger("saev_core.analysis.splice")
SPLICE_MODES = ("patches", "cls")


@dataclasses.dataclass(frozen=True)
class SpliceResult:
    """Mean cosine similarities of the final embedding to the untouched one, over ``n_images`` held-out images."""

    cos_sae: float
    cos_zero: float
    cos_mean: float
    gap_recovered: float
    """(cos_sae - cos_zero) / (1 - cos_zero); NaN when zero ablation changes nothing."""
    gap_recovered_mean: float
    """(cos_sae - cos_mean) / (1 - cos_mean); NaN when mean ablation changes nothing."""
    n_images: int

    def line(self) -> str:
        return (
            f"cos(SAE) {self.cos_sae:.4f}, cos(zero) {self.cos_zero:.4f}, cos(mean) {self.cos_mean:.4f}; gap "
            f"recovered {self.gap_recovered:.4f} (vs zero), {self.gap_recovered_mean:.4f} (vs mean) over "
            f"{self.n_images} held-out images"
        )


def gap_recovered(cos: float, cos_bound: float) -> float:
    """The fraction of the gap between an ablation (cos_bound) and the untouched model (1) that ``cos`` closes."""
    gap = 1.0 - cos_bound
    return (cos - cos_bound) / gap if gap > 1e-6 else math.nan


class _TokenSplice:
    """A forward hook on one residual block that replaces the token mode's vectors with ``replace(x)`` while set."""

    def __init__(self, vit: vitlib.VisionTransformer, block: int, token_mode: str):
        self.vit, self.token_mode = vit, token_mode
        self.replace: Callable[[Tensor], Tensor] | None = None
        self.handle = vit.residual_blocks[block].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.replace is None:
            return None
        x = output[0] if isinstance(output, tuple) else output
        x = x.transpose(0, 1) if self.vit.tokens_first else x  # [batch, tokens, d]
        x = x.clone()
        if self.token_mode == "cls":
            x[:, 0] = self.replace(x[:, 0])
        else:
            n = self.vit.n_prefix_tokens
            patches = x[:, n:]
            x[:, n:] = self.replace(patches.reshape(-1, x.shape[-1])).reshape(patches.shape)
        x = x.transpose(0, 1) if self.vit.tokens_first else x
        return (x, *output[1:]) if isinstance(output, tuple) else x


class SpliceEvaluator:
    """The ViT, a batch of held-out pixels, and its untouched, zero- and mean-ablated embeddings (computed once)."""

    def __init__(
        self,
        vit: vitlib.VisionTransformer,
        layer: int,
        token_mode: str,
        mean: Float[Tensor, " d_vit"],
        pixels: Float[Tensor, "imgs 3 h w"],
        device: str = "cpu",
        batch_size: int = 32,
        n_threads: int | None = None,
    ):
        if token_mode not in SPLICE_MODES:
            raise UserError(
                f"Splice-in needs an SAE trained on patches or cls tokens, not {token_mode!r} (a meanpool "
                "vector is not a token of the residual stream)."
            )
        [block] = vitlib.resolve_layers([layer], vit.n_blocks)
        self.vit = vit.to(device)
        self.device, self.batch_size = device, batch_size
        self.tuner = threads.tuner_for(n_threads, device)  # one for every pass: their batches cost the same
        self.pixels = pixels
        self.splice = _TokenSplice(self.vit, block, token_mode)
        self.mean = mean.to(device, torch.float32)
        self.original = self.embed(None)
        self.cos_zero = self.cosine(torch.zeros_like)
        self.cos_mean = self.cosine(lambda x: self.mean.expand_as(x))

    @torch.inference_mode()
    def embed(self, replace: Callable[[Tensor], Tensor] | None) -> Float[Tensor, "imgs d_out"]:
        """The ViT's final embeddings of every held-out image, with the hook replacing the layer (None: untouched)."""
        out = []
        self.splice.replace = replace
        try:
            with threads.apply(self.tuner):
                for start in range(0, len(self.pixels), self.batch_size):
                    emb = self.vit(self.pixels[start : start + self.batch_size].to(self.device))
                    out.append(emb.float().reshape(len(emb), -1))
                    self.tuner.step_done(len(emb))
                self.tuner.settle()
        finally:
            self.splice.replace = None
        return torch.cat(out)

    def cosine(self, replace: Callable[[Tensor], Tensor]) -> float:
        """Mean cosine similarity of the spliced embeddings to the untouched ones."""
        spliced = self.embed(replace)
        return float(torch.nn.functional.cosine_similarity(spliced.double(), self.original.double(), dim=-1).mean())

    def evaluate(self, sae: nn.SparseAutoencoder) -> SpliceResult:
        sae = sae.to(self.device).eval()
        cos = self.cosine(lambda x: sae(x).x_hat)
        return SpliceResult(
            cos,
            self.cos_zero,
            self.cos_mean,
            gap_recovered(cos, self.cos_zero),
            gap_recovered(cos, self.cos_mean),
            len(self.pixels),
        )

    def close(self) -> None:
        self.splice.handle.remove()


# ----------------------------------------------------------------------------------------------------------------
# From checkpoints: the held-out images of the store the SAE was trained on
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """What a checkpoint was trained on, from its provenance and the config.json beside it."""

    store: str
    layer: int
    token_mode: str
    vit_family: str
    vit_ckpt: str
    val_frac: float
    seed: int


def trained_on(ckpt: str, sae: nn.SparseAutoencoder) -> TrainedOn:
    prov = sae.provenance
    needed = ("store", "layer", "token_mode", "vit_family", "vit_ckpt")
    missing = [key for key in needed if prov.get(key) is None]
    if missing:
        raise UserError(
            f"The checkpoint {ckpt} does not record {', '.join(missing)} (a saev 0.1.0 file, or one from "
            "elsewhere): splice-in needs the store and ViT it was trained on. Evaluate a checkpoint "
            "written by `python -m saev_core train`."
        )
    data, seed = {}, prov.get("data_seed", config.TrainConfig.seed)
    saved = read_json(os.path.join(os.path.dirname(ckpt), "config.json"))
    if saved is not None:
        data, seed = saved.get("data", {}), saved.get("seed", seed)
    from saev_core.analysis.inference import findable_ckpt

    return TrainedOn(
        prov["store"],
        int(prov["layer"]),
        prov["token_mode"],
        prov["vit_family"],
        findable_ckpt(prov["vit_family"], prov["vit_ckpt"], prov),
        float(data.get("val_frac", config.DataLoadConfig.val_frac)),
        int(seed),
    )


def held_out_pixels(
    store: ActivationStore, on: TrainedOn, transform, max_images: int | None, image_root: str | None = None
) -> Float[Tensor, "imgs 3 h w"]:
    """The ViT inputs of the store's held-out images (the loader's split; a seeded sample of ``max_images``)."""
    _, val = loader.split_images(store, on.val_frac, on.seed)
    if len(val) == 0:
        raise UserError(
            f"The SAE was trained with val_frac {on.val_frac}: the store {store.path} has no held-out "
            "images to evaluate on."
        )
    if max_images is not None and len(val) > max_images:
        val = np.sort(np.random.default_rng(on.seed).choice(val, max_images, replace=False))
    root = image_root or store.metadata.image_root
    if root is None or not os.path.isdir(root):
        raise UserError(
            f"The images of the store {store.path} are not at {root!r} any more; pass --images-root with "
            "the folder they moved to."
        )
    paths = store.image_paths()
    return torch.stack([transform(imagelib.load_rgb(os.path.join(root, paths[i]))) for i in val])


def evaluate_checkpoints(
    ckpts: Sequence[str],
    device: str = "auto",
    max_images: int | None = 256,
    batch_size: int = 32,
    image_root: str | None = None,
    n_threads: int | None = None,
) -> list[SpliceResult]:
    """Splice-in fidelity of each checkpoint; checkpoints of the same store, layer and token mode share the ViT's
    untouched and ablated passes. ``n_threads``: torch's CPU threads; None times the batches and picks
    (``saev_core.threads``)."""
    device = config.resolve_device(device)
    results: dict[str, SpliceResult] = {}
    groups: dict[tuple, list[tuple[str, nn.SparseAutoencoder]]] = {}
    for ckpt in ckpts:
        path = nn.ckpt_file(ckpt)
        sae = nn.load(path, device="cpu")
        on = trained_on(path, sae)
        groups.setdefault(dataclasses.astuple(on), []).append((ckpt, sae))
    for key, members in groups.items():
        on = TrainedOn(*key)
        store = ActivationStore.open(on.store)
        recorded = store.recorded_layer(on.layer)
        vit = vitlib.make_vit(on.vit_family, on.vit_ckpt)
        pixels = held_out_pixels(
            store, on, vitlib.make_img_transform(on.vit_family, on.vit_ckpt), max_images, image_root
        )
        mean = torch.as_tensor(stats.raw_stats(store, recorded, on.token_mode)[0], dtype=torch.float32)
        vitlib.check_forward_memory(min(batch_size, len(pixels)), store.n_tokens, store.d_vit, device, "--batch-size")
        evaluator = SpliceEvaluator(vit, on.layer, on.token_mode, mean, pixels, device, batch_size, n_threads)
        try:
            for ckpt, sae in members:
                results[ckpt] = evaluator.evaluate(sae)
                logger.info("%s: %s", ckpt, results[ckpt].line())
        finally:
            evaluator.close()
    return [results[ckpt] for ckpt in ckpts]
