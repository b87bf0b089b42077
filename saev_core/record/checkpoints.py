"""Checkpoint strings (``--vit-ckpt``): which architecture and where its weights come from. Imports no torch, so the
Dagster code location can check a pipeline file's checkpoint when it loads."""

import dataclasses
import os

from saev_core.errors import UserError

FAMILIES = ("clip", "siglip", "dinov2")


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A parsed ``--vit-ckpt``: the architecture and where its weights come from (a tag, a local file, or the hub)."""

    family: str
    arch: str
    """open_clip model name (``ViT-B-32``) or timm model name (``vit_small_patch14_reg4_dinov2.lvd142m``)."""
    tag: str | None
    """open_clip pretrained tag (``openai``); None for a local file and for timm names."""
    path: str | None
    """Absolute path of a local weights file; None for a tag or timm's hub weights."""


def parse_ckpt(family: str, ckpt: str, must_exist: bool = True) -> CheckpointRef:
    """Split a checkpoint string at its FIRST '/': ``ARCH`` before it, weights after it.

    For clip/siglip the rest is a local file when it contains '/' or '.' or names an existing file (so
    ``ViT-B-32/./openai`` forces a file named ``openai``); otherwise it is an open_clip pretrained tag.
    Absolute paths work: ``ViT-B-32//data/w.pt``. For dinov2 the rest, when present, is always a file (timm puts its
    tag in the name: ``vit_small_patch14_dinov2.lvd142m``); without it timm's hub weights are used.
    """
    check_family(family)
    arch, sep, rest = ckpt.partition("/")
    if not arch:
        raise UserError(f"--vit-ckpt {ckpt!r} has no architecture before the first '/'; pass e.g. {_example(family)}")
    if family == "dinov2":
        if not rest:
            return CheckpointRef(family, arch, None, None)
        return CheckpointRef(family, arch, None, _existing_file(rest, ckpt, must_exist))
    if not rest:
        raise UserError(
            f"--vit-ckpt {ckpt!r} names no weights; pass {arch}/TAG (an open_clip pretrained tag, see "
            f"open_clip.list_pretrained_tags_by_model({arch!r})) or {arch}/path/to/weights.pt"
        )
    if "/" in rest or "." in rest or os.path.exists(rest):
        return CheckpointRef(family, arch, None, _existing_file(rest, ckpt, must_exist))
    return CheckpointRef(family, arch, rest, None)


def absolute_ckpt(family: str, ckpt: str) -> str:
    """``ckpt`` with a relative local weights path made absolute against the current folder (``ARCH//abs/path``), so
    a checkpoint's provenance still finds the ViT from another folder; tags, hub names and URLs are unchanged, and so
    is a relative path that names no file here (it may be relative to another folder: kept as written)."""
    try:
        ref = parse_ckpt(family, ckpt, must_exist=False)
    except UserError:  # not a checkpoint string this version reads: nothing to resolve
        return ckpt
    if ref.path is None or not os.path.isfile(ref.path):
        return ckpt
    return f"{ref.arch}/{ref.path}"


def _existing_file(path: str, ckpt: str, must_exist: bool = True) -> str:
    full = os.path.abspath(os.path.expanduser(path))
    if must_exist and not os.path.isfile(full):
        what = "is a folder, not a file" if os.path.isdir(full) else "does not exist"
        raise UserError(
            f"checkpoint file {full} (from --vit-ckpt {ckpt!r}) {what}; "
            "pass the path of a weights file (.pt, .pth, .bin or .safetensors)"
        )
    return full


def _example(family: str) -> str:
    return "vit_small_patch14_reg4_dinov2.lvd142m" if family == "dinov2" else "ViT-B-32/openai"


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UserError(f"unknown ViT family {family!r}; known families: {', '.join(FAMILIES)} (--vit-family)")


def known_n_blocks(family: str, arch: str) -> int | None:
    """The number of residual blocks of an open_clip architecture, read from its model config (ours or
    open_clip's, found without importing open_clip); None when the config does not say (timm towers, dinov2)."""
    import importlib.util
    import json
    import pathlib

    if family != "clip":
        return None
    places = [pathlib.Path(__file__).parent / "vit_configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        places.append(pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_configs")
    for folder in places:
        path = folder / f"{arch}.json"
        if path.is_file():
            layers = json.loads(path.read_text()).get("vision_cfg", {}).get("layers")
            return layers if isinstance(layers, int) else None
    return None


def load_failure(err: BaseException) -> str:
    """Why a weights file could not be loaded, in our words: torch's weights-only refusal comes with advice to
    retry with ``weights_only=False``, which runs whatever code the file holds, so it is replaced by safe advice;
    other errors keep their first sentence."""
    text = str(err).strip()
    if type(err).__name__ == "UnpicklingError" or "weights_only" in text or "Weights only load failed" in text:
        return (
            "the file holds Python objects other than tensors, which could run code when loaded, and this loader "
            "reads plain tensors only. Re-save the weights from a source you trust as a state dict of tensors "
            "(torch.save(model.state_dict(), path))"
        )
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
