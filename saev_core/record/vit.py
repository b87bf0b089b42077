"""ViT families and the residual-stream recorder.

A family says how to build a ViT from a checkpoint string and where its residual stream is:

- ``clip``: open_clip ViTs; ``ckpt = "ARCH/TAG"`` or ``"ARCH/path/to/weights"``.
- ``siglip``: open_clip towers built on timm (``ViT-B-16-SigLIP``), same ``ckpt`` forms; no CLS token.
- ``dinov2``: timm ViTs (with or without register tokens, and other timm ViTs); ``ckpt = "TIMM_NAME"`` or
  ``"TIMM_NAME/path/to/weights"``; run at 224 px (timm's default for DINOv2 is 518).

Local weights always go through the library's own loading code (``open_clip.create_model(arch, pretrained=path)``,
timm's ``pretrained_cfg_overlay=dict(file=path)``), the same path real weights take. open_clip and timm are imported
inside functions: they are slow to import and this module is imported by code that may not need them.
"""

import contextlib
import dataclasses
import difflib
import hashlib
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import atomic_write, atomic_write_bytes
from saev_core.record.checkpoints import CheckpointRef, check_family, load_failure, parse_ckpt

TIMM_IMG_SIZE = 224
"""Image size for timm ViTs (``dinov2``): 224 px like the other families; position embeddings are resampled."""
CONFIG_DIR = pathlib.Path(__file__).parent / "vit_configs"
"""Tiny open_clip model configs shipped with the package (``saev-tiny-clip``), for tests and demos."""
_HASH_PIECE = 8 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint strings
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_fingerprint(family: str, ckpt: str) -> str:
    """Content fingerprint of a checkpoint: the blake2b hash of a local file's bytes (streamed in 8 MB pieces), or
    the hash of ``family:ckpt`` for a tag or hub name. New weights under the same path give a new fingerprint."""
    ref = parse_ckpt(family, ckpt)
    h = hashlib.blake2b(digest_size=16)
    if ref.path is None:
        h.update(f"{family}:{ckpt}".encode())
        return h.hexdigest()
    with open(ref.path, "rb") as f:
        while piece := f.read(_HASH_PIECE):
            h.update(piece)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Building models
# ----------------------------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """One ViT of any family, in eval mode and float32, with what the recorder needs to find its residual stream."""

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        ckpt: str,
        arch: str,
        residual_blocks: Iterable[nn.Module],
        d_vit: int,
        grid: tuple[int, int],
        has_cls: bool,
        n_prefix_tokens: int,
        tokens_first: bool = False,
    ):
        super().__init__()
        self.model = model.eval().float().requires_grad_(False)
        self.family = family
        self.ckpt = ckpt
        self.arch = arch
        self.residual_blocks = list(residual_blocks)
        """Blocks whose forward output is the residual stream (in order; block i's output is layer i)."""
        self.n_blocks = len(self.residual_blocks)
        self.d_vit = int(d_vit)
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_patches_per_img = self.grid[0] * self.grid[1]
        self.has_cls = has_cls
        """CLS is token 0 of the block outputs when present (open_clip and timm both prepend it)."""
        self.n_prefix_tokens = n_prefix_tokens
        """Tokens before the patches in block outputs: CLS + register tokens."""
        self.tokens_first = tokens_first
        """Block outputs are [tokens, batch, d] (open_clip before batch_first); the recorder transposes them."""
        self.eval()

    def forward(self, pixels: Float[Tensor, "batch 3 height width"]) -> Tensor:
        """The model's own output (the image embedding for clip/siglip, pooled features for timm)."""
        return self.model(pixels)


def make_vit(family: str, ckpt: str) -> VisionTransformer:
    """Build a ViT from ``--vit-family`` and ``--vit-ckpt`` (see :func:`parse_ckpt` for the checkpoint forms)."""
    ref = parse_ckpt(family, ckpt)
    if family == "dinov2":
        return _wrap_timm(ref, ckpt, _build_timm(ref))
    visual = _build_open_clip(ref).visual
    if family == "clip":
        return _wrap_open_clip_vit(ref, ckpt, visual)
    return _wrap_open_clip_timm(ref, ckpt, visual)


def _open_clip():
    """open_clip with our tiny configs registered (once)."""
    import open_clip

    if open_clip.get_model_config("saev-tiny-clip") is None:
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def _check_open_clip_arch(arch: str) -> dict:
    open_clip = _open_clip()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(
            f"unknown open_clip architecture {arch!r}{hint}; valid names are in open_clip.list_models(), "
            "e.g. ViT-B-32 in --vit-ckpt ViT-B-32/openai"
        )
    return cfg


def _build_open_clip(ref: CheckpointRef) -> nn.Module:
    """The full open_clip model (both towers: a checkpoint file holds both, and strict loading needs them)."""
    open_clip = _open_clip()
    _check_open_clip_arch(ref.arch)
    if ref.path is not None:
        try:
            return open_clip.create_model(ref.arch, pretrained=ref.path)
        except Exception as err:  # a wrong or corrupt file: RuntimeError, UnpicklingError, EOFError, ...
            raise UserError(
                f"could not load {ref.path} as {ref.arch} weights ({load_failure(err)}); check that the "
                f"file holds a full open_clip {ref.arch} model (both towers)"
            ) from None
    tags = open_clip.list_pretrained_tags_by_model(ref.arch)
    if ref.tag not in tags:
        raise UserError(
            f"unknown pretrained tag {ref.tag!r} for {ref.arch}; known tags: {', '.join(tags) or 'none'}. "
            f"For a local file pass {ref.arch}/path/to/weights.pt (a path contains '/' or '.')"
        )
    # Tags trained with QuickGELU (openai) need it; open_clip only warns when the config lacks it.
    quick_gelu = bool(open_clip.get_pretrained_cfg(ref.arch, ref.tag).get("quick_gelu", False))
    try:
        return open_clip.create_model(ref.arch, pretrained=ref.tag, force_quick_gelu=quick_gelu)
    except RuntimeError as err:
        raise UserError(
            f"could not get the {ref.arch}/{ref.tag} weights: {err}; without internet, download them elsewhere "
            f"and pass --vit-ckpt {ref.arch}/path/to/weights"
        ) from err


def _wrap_open_clip_vit(ref: CheckpointRef, ckpt: str, visual: nn.Module) -> VisionTransformer:
    transformer = getattr(visual, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        raise UserError(
            f"{ref.arch}'s image tower is a {type(visual).__name__}, not an open_clip ViT; "
            "use --vit-family siglip for timm-based towers"
        )
    return VisionTransformer(
        visual,
        family=ref.family,
        ckpt=ckpt,
        arch=ref.arch,
        residual_blocks=transformer.resblocks,
        d_vit=transformer.width,
        grid=visual.grid_size,
        has_cls=True,  # open_clip always prepends class_embedding
        n_prefix_tokens=1,
        # open_clip < 2.23 ran its transformer as [tokens, batch, d]; 3.x is batch_first.
        tokens_first=not getattr(transformer, "batch_first", False),
    )


def _wrap_open_clip_timm(ref: CheckpointRef, ckpt: str, visual: nn.Module) -> VisionTransformer:
    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks"):
        raise UserError(
            f"{ref.arch}'s image tower is a {type(visual).__name__}, not a timm ViT tower; "
            "use --vit-family clip for open_clip ViTs"
        )
    return _timm_vit(visual, ref, ckpt, trunk)


def _timm_vit(model: nn.Module, ref: CheckpointRef, ckpt: str, trunk: nn.Module) -> VisionTransformer:
    return VisionTransformer(
        model,
        family=ref.family,
        ckpt=ckpt,
        arch=ref.arch,
        residual_blocks=trunk.blocks,
        d_vit=trunk.embed_dim,
        grid=trunk.patch_embed.grid_size,
        has_cls=getattr(trunk, "cls_token", None) is not None,
        n_prefix_tokens=trunk.num_prefix_tokens,
    )


def _check_timm_arch(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(
            f"unknown timm model {name!r}{hint}; valid names are in timm.list_models('*dinov2*') "
            "(or timm.list_models()), e.g. --vit-ckpt vit_small_patch14_reg4_dinov2.lvd142m"
        )


def _build_timm(ref: CheckpointRef) -> nn.Module:
    import timm

    _check_timm_arch(ref.arch)
    if ref.path is not None:
        # timm's file route applies the model's checkpoint filter, which resamples the position embedding.
        overlay = dict(file=ref.path)
        try:
            return timm.create_model(ref.arch, pretrained=True, pretrained_cfg_overlay=overlay, img_size=TIMM_IMG_SIZE)
        except Exception as err:  # a wrong or corrupt file: RuntimeError, UnpicklingError, EOFError, ...
            raise UserError(
                f"could not load {ref.path} as {ref.arch} weights ({load_failure(err)}); check that the "
                f"file holds timm {ref.arch} weights"
            ) from None
    try:
        return timm.create_model(ref.arch, pretrained=True, img_size=TIMM_IMG_SIZE)
    except Exception as err:  # hub download failures come as many exception types
        raise UserError(
            f"could not get timm's pretrained weights for {ref.arch}: {err}; without internet, download them "
            f"elsewhere and pass --vit-ckpt {ref.arch}/path/to/weights"
        ) from err


def _wrap_timm(ref: CheckpointRef, ckpt: str, model: nn.Module) -> VisionTransformer:
    if not all(hasattr(model, a) for a in ("blocks", "patch_embed", "num_prefix_tokens")):
        raise UserError(f"timm model {ref.arch!r} is a {type(model).__name__}, not a ViT; pick a timm ViT name")
    return _timm_vit(model, ref, ckpt, model)


def check_forward_memory(batch: int, n_tokens: int, d_vit: int, device: str, flag: str) -> None:
    """Refuse a ViT batch whose forward pass cannot fit in ``device``'s free memory, before loading anything onto
    it. The estimate is a lower bound (the float32 residual stream and one MLP hidden layer, 4 x d_vit wide, of every
    image: what any block holds at once), so a refusal is certain."""
    nbytes = batch * n_tokens * d_vit * 4 * 5
    config.check_memory(
        nbytes,
        device,
        f"{flag} {batch}: one ViT forward pass ({batch} images x {n_tokens} tokens x {d_vit} x 4 bytes x 5, the "
        "residual stream and an MLP hidden layer)",
        f"Lower {flag}.",
    )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Drop warnings sent to the root logger inside the block without installing logging's default stderr handler
    (``logging.warning`` would install it for the rest of the process when the root logger has none)."""
    root = logging.getLogger()
    level, quiet = root.level, logging.NullHandler()
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.removeHandler(quiet)


def save_random_weights(family: str, arch: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Save a randomly initialised model where ``make_vit(family, f"{arch}/{path}")`` reads it.

    The whole open_clip model (clip/siglip) or the timm model at its default size (dinov2, so loading resamples the
    position embedding as for real weights). Written to a temporary file and renamed, so no half file is visible.
    ``.safetensors`` paths are written as safetensors, others with ``torch.save``.
    """
    check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "dinov2":
            import timm

            _check_timm_arch(arch)
            model = timm.create_model(arch, pretrained=False)
        else:
            _check_open_clip_arch(arch)
            with _quiet_root_logger():  # open_clip warns "No pretrained weights loaded": random weights are the point
                model = _open_clip().create_model(arch)
    state_dict = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save

        # clone: safetensors refuses tensors that share storage
        return atomic_write_bytes(path, save({k: v.clone() for k, v in state_dict.items()}))
    return atomic_write(path, lambda f: torch.save(state_dict, f))


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------------------------


def make_img_transform(family: str, ckpt: str) -> Callable:
    """The model's eval preprocessing: PIL image (RGB) -> Float[Tensor, "3 height width"]. Builds no model.

    clip/siglip: open_clip's ``image_transform`` with the model's image size and the tag's mean/std/resize mode.
    For a local file the preprocessing shared by all of the architecture's pretrained tags is used (SigLIP: mean and
    std 0.5, squash), else open_clip's default (OpenAI mean/std). dinov2: timm's transform for the model at 224 px.
    """
    ref = parse_ckpt(family, ckpt, must_exist=False)  # the preprocessing needs no weights
    if family == "dinov2":
        import timm
        from timm.data import create_transform, resolve_data_config

        _check_timm_arch(ref.arch)
        pretrained_cfg = timm.models.get_pretrained_cfg(ref.arch)
        args = {"input_size": (3, TIMM_IMG_SIZE, TIMM_IMG_SIZE)}
        # A model built at 224 px still reports its 518 px pretrained input size, so the size is set here.
        data_cfg = resolve_data_config(args=args, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
        return create_transform(**data_cfg, is_training=False)

    open_clip = _open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    cfg = _check_open_clip_arch(ref.arch)
    preprocess = dataclasses.asdict(PreprocessCfg())
    tags = [ref.tag] if ref.tag is not None else open_clip.list_pretrained_tags_by_model(ref.arch)
    overlays = [merge_preprocess_dict({}, open_clip.get_pretrained_cfg(ref.arch, t)) for t in tags]
    if overlays and all(o == overlays[0] for o in overlays):
        preprocess = merge_preprocess_dict(preprocess, overlays[0])
    preprocess["size"] = cfg["vision_cfg"]["image_size"]
    return image_transform_v2(PreprocessCfg(**preprocess), is_train=False)


# ----------------------------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------------------------


def resolve_layers(layers: Sequence[int], n_blocks: int) -> list[int]:
    """Block indices for ``--vit-layers``; negative counts from the end (-2 of 12 blocks is block 10)."""
    if len(layers) == 0:
        raise UserError(f"no layers to record; pass --vit-layers with indices in {-n_blocks}..{n_blocks - 1}")
    resolved = []
    for layer in layers:
        if not -n_blocks <= layer < n_blocks:
            raise UserError(
                f"layer {layer} out of range for a ViT with {n_blocks} blocks; valid: {-n_blocks}..{n_blocks - 1}"
            )
        block = layer % n_blocks
        if block in resolved:
            other = layers[resolved.index(block)]
            raise UserError(f"layers {other} and {layer} are both block {block}; list each block once in --vit-layers")
        resolved.append(block)
    return resolved


def check_d_vit(vit: VisionTransformer, d_vit: int | None) -> None:
    """A given ``--d-vit`` must be the model's width (None: nothing to check)."""
    if d_vit is not None and d_vit != vit.d_vit:
        raise UserError(f"--d-vit {d_vit} does not match {vit.arch}'s width {vit.d_vit}; pass --d-vit {vit.d_vit}")


class _StopForward(Exception):
    """Raised by the hook of the deepest recorded block: nothing after it is needed. An ``Exception`` (not a
    ``BaseException``) so that torch's module call still runs its clean-up on the way out; library code that caught
    and swallowed it would only cost the saving, never correctness (the hooks have recorded by then)."""


class RecordedVisionTransformer(nn.Module):
    """A ViT plus forward hooks that record the residual stream (the output of chosen blocks).

    ``forward`` returns ``(output, acts)``; ``acts[:, i]`` is block ``resolved_layers[i]``'s output with token 0 the
    CLS token (when ``cls_token``) and then the patches in the ViT's order; register tokens are dropped.

    By default the forward pass stops right after the deepest recorded block: no later block and no head runs
    (recording layer 3 of a 12-block ViT costs about a third of a full pass), and ``output`` is None. The blocks
    that do run compute exactly what they compute in a full pass, so the activations are the same bits.
    ``full_pass=True`` runs the whole ViT and ``output`` is its output (the image embedding for clip/siglip, pooled
    features for timm), as in saev. The hooks act only inside this recorder's ``forward``: calling the ViT itself
    runs it whole, unrecorded.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        n_patches_per_img: int | None,
        cls_token: bool,
        layers: Sequence[int],
        full_pass: bool = False,
    ):
        super().__init__()
        n_model = vit.n_patches_per_img
        if n_patches_per_img is not None and n_patches_per_img != n_model:
            rows, cols = vit.grid
            raise UserError(
                f"--n-patches-per-img {n_patches_per_img} does not match the model: model {vit.arch} has {n_model} "
                f"patches per image ({rows}x{cols}); pass --n-patches-per-img {n_model}"
            )
        if cls_token and not vit.has_cls:
            raise UserError(f"{vit.family} has no CLS token ({vit.arch}); pass --no-cls-token")
        self.vit = vit
        self.n_patches_per_img = n_model
        self.cls_token = cls_token
        self.layers = list(layers)
        self.resolved_layers = resolve_layers(self.layers, vit.n_blocks)
        self.full_pass = full_pass
        """Run the whole ViT and return its output; False: stop after the deepest recorded block (output None)."""
        self._deepest = max(self.resolved_layers)
        self._running = False  # the hooks record (and may stop the pass) only inside forward
        self._acts: dict[int, Tensor] = {}
        self._handles = [
            vit.residual_blocks[block].register_forward_hook(self._make_hook(block)) for block in self.resolved_layers
        ]

    @property
    def n_tokens(self) -> int:
        return self.n_patches_per_img + int(self.cls_token)

    def _make_hook(self, block: int):
        def hook(module: nn.Module, inputs, output) -> None:
            if not self._running:
                return
            self._acts[block] = self._select_tokens(output[0] if isinstance(output, tuple) else output)
            if block == self._deepest and not self.full_pass:
                raise _StopForward(self)

        return hook

    def _select_tokens(self, x: Tensor) -> Float[Tensor, "batch n_tokens d_vit"]:
        vit = self.vit
        if vit.tokens_first:
            x = x.transpose(0, 1)
        n_prefix, n_patches = vit.n_prefix_tokens, self.n_patches_per_img
        if x.shape[1] != n_prefix + n_patches:
            raise RuntimeError(
                f"block output has {x.shape[1]} tokens, expected {n_prefix} prefix + {n_patches} patches; "
                f"are the images {vit.arch}'s input size (use make_img_transform)?"
            )
        patches = x[:, n_prefix:]
        if not self.cls_token:
            return patches
        if n_prefix == 1:
            return x
        return torch.cat([x[:, :1], patches], dim=1)

    def forward(
        self, x: Float[Tensor, "batch 3 height width"]
    ) -> tuple[Tensor | None, Float[Tensor, "batch n_layers n_tokens d_vit"]]:
        """(the ViT's output, or None when the pass stopped early; the recorded blocks' outputs)."""
        self._acts, self._running = {}, True
        try:
            try:
                output = self.vit(x)
            except _StopForward as stop:
                if stop.args[0] is not self:  # another recorder's: not ours to end
                    raise
                output = None
            acts = torch.stack([self._acts[block] for block in self.resolved_layers], dim=1)
        finally:
            self._acts, self._running = {}, False
        return output, acts

    def remove_hooks(self) -> None:
        """Detach the hooks from the ViT (the ViT can then be recorded by another recorder without this overhead)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
