"""The SAE checkpoint file, ``sae.pt``: write it, read it back (saev 0.1.0's files too), read its provenance.

One line of JSON header, ``{"schema": 1, "arch", "cfg", "d_vit", "d_sae", "provenance"}``, then
``torch.save(state_dict)`` in the same file, so one file carries both and a reader needs no pickled classes. saev
0.1.0 files (header without "schema") load as ``relu``. Reading checks every header field and the tensors' shapes
before allocating the SAE, and unpickles plain tensors only: a checkpoint is often someone else's file.
"""

import dataclasses
import json
import os

import torch

from saev_core import config
from saev_core.errors import UserError
from saev_core.files import atomic_write
from saev_core.nn.sae import SparseAutoencoder
from saev_core.nn.variants import make_sae
from saev_core.tables import from_table

SCHEMA = 1
CKPT_NAME = "sae.pt"
_MAX_HEADER_BYTES = 1 << 20


def ckpt_file(path: str | os.PathLike) -> str:
    """The checkpoint file a path names: ``path`` itself, or ``path/sae.pt`` for a member's folder."""
    path = os.fspath(path)
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def dump(path: str | os.PathLike, sae: SparseAutoencoder, provenance: dict | None = None) -> str:
    """Write ``sae`` atomically to ``path`` (a file, or a folder that gets ``sae.pt``); returns the file's path.

    ``provenance`` (store key, layer, token mode, ViT...) is merged over ``sae.provenance``; values that are not
    JSON are written as strings.
    """
    path = ckpt_file(path)
    header = {
        "schema": SCHEMA,
        "arch": sae.cfg.arch,
        "cfg": dataclasses.asdict(sae.cfg),
        "d_vit": sae.cfg.d_vit,
        "d_sae": sae.cfg.d_sae,
        "provenance": {**sae.provenance, **(provenance or {})},
    }
    state = {key: value.detach().cpu() for key, value in sae.state_dict().items()}

    def write(f) -> None:
        f.write((json.dumps(header, default=str) + "\n").encode())
        torch.save(state, f)

    atomic_write(path, write)
    return path


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read a checkpoint written by ``dump`` or by saev 0.1.0; returns the SAE in eval mode on ``device``.

    Nothing is allocated before the header's sizes agree with the tensors in the file, and the tensors are read
    with torch's ``weights_only`` unpickler alone (a file that needs more is refused, never run)."""
    path = ckpt_file(path)
    not_ckpt = _not_checkpoint(path)
    try:
        with open(path, "rb") as f:
            header = _read_header(f, not_ckpt)
            cfg, legacy = _cfg_from_header(header, not_ckpt)
            state = _read_state_dict(f, device, not_ckpt)
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror or err}. Check the path and its permissions.") from None

    provenance = header.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise not_ckpt(f"the header's provenance is {type(provenance).__name__}, not a JSON object")
    _check_sizes(cfg, state, not_ckpt)  # before make_sae allocates d_vit x d_sae twice
    try:
        sae = make_sae(cfg)
    except UserError as err:  # settings no variant trains with (k > d_sae...)
        raise not_ckpt(f"the header's cfg: {err}") from None
    # Firing counters are training state: files from before every variant kept them load with zeros.
    optional = {"mean", "scale", "n_patches_since_fired"} if legacy else {"n_patches_since_fired"}
    try:
        missing, unexpected = sae.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise not_ckpt(f"weights do not match the header: {err}") from None
    if unexpected or set(missing) - optional:
        raise not_ckpt(f"state dict keys do not match arch {cfg.arch}: missing {missing}, unexpected {unexpected}")
    sae.provenance = dict(provenance)
    return sae.to(device).eval()


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance in a checkpoint's header line, without reading its weights ({} for a saev 0.1.0 file)."""
    path = ckpt_file(path)
    not_ckpt = _not_checkpoint(path)
    try:
        with open(path, "rb") as f:
            header = _read_header(f, not_ckpt)
    except OSError as err:
        raise UserError(f"Cannot read {path}: {err.strerror or err}. Check the path and its permissions.") from None
    provenance = header.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise not_ckpt(f"the header's provenance is {type(provenance).__name__}, not a JSON object")
    return dict(provenance)


def _not_checkpoint(path: str):
    """The UserError maker for ``path``'s problems; raises at once when there is no file at all."""
    expected = "expected an SAE checkpoint: a JSON header line, then a torch state dict (saev-dagster or saev 0.1.0)"

    def not_ckpt(why: str) -> UserError:
        return UserError(f"{path} is not an SAE checkpoint ({why}); {expected}.")

    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; {expected}.")
    return not_ckpt


def _read_header(f, not_ckpt) -> dict:
    """The JSON object on a checkpoint's first line (at most _MAX_HEADER_BYTES)."""
    line = f.readline(_MAX_HEADER_BYTES)
    if not line.endswith(b"\n"):
        raise not_ckpt("empty file" if not line else "no header line")
    try:
        header = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise not_ckpt(f"the first line is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise not_ckpt("the header is not a JSON object")
    return header


def _read_state_dict(f, device, not_ckpt) -> dict:
    """The state dict after the header, read by torch's weights-only unpickler. Torch's own message for a refused
    file advises turning that safety off; it must never reach the user, so it is replaced, not passed on."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on pickle protocols are not the user's business
            state = torch.load(f, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise not_ckpt(
            "the data after the header holds Python objects other than tensors, which could run code "
            "when loaded; this loader reads plain tensors only. Re-save the weights as a plain state dict "
            "of tensors (nn.dump does)"
        ) from None
    except Exception as err:
        # torch's first sentence says what failed; the rest is advice (some of it unsafe) for programmers.
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err):
            first = type(err).__name__
        raise not_ckpt(f"no readable state dict after the header: the file is cut short or damaged ({first})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise not_ckpt("the data after the header is not a state dict of named tensors")
    return state


def _check_sizes(cfg: config.SparseAutoencoderConfig, state: dict, not_ckpt) -> None:
    """The weights' shapes the header's d_vit and d_sae imply, against the tensors actually in the file."""
    want = {
        "W_enc": (cfg.d_vit, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_vit),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_vit,),
    }
    for name, shape in want.items():
        if name not in state:
            raise not_ckpt(f"the state dict has no {name}")
        if tuple(state[name].shape) != shape:
            raise not_ckpt(
                f"the header says d_vit={cfg.d_vit}, d_sae={cfg.d_sae}, so {name} should be "
                f"{list(shape)}, but the file holds {list(state[name].shape)}"
            )


def _cfg_from_header(header: dict, not_ckpt) -> tuple[config.SparseAutoencoderConfig, bool]:
    """The config a header describes, and whether it is a saev 0.1.0 header; every field's type and range checked."""
    if "schema" in header:
        if header["schema"] != SCHEMA:
            raise not_ckpt(f"schema {header['schema']!r} is not supported (this version reads schema {SCHEMA})")
        fields = header.get("cfg")
        if not isinstance(fields, dict):
            raise not_ckpt(f"the header's cfg is {type(fields).__name__}, not a JSON object")
        return _typed_cfg(fields, "cfg.", not_ckpt), False
    if "d_vit" in header and "exp_factor" in header:  # saev 0.1.0: the relu recipe, identity normalisation.
        fields = {
            "d_vit": header["d_vit"],
            "exp_factor": header["exp_factor"],
            "arch": "relu",
            **{k: header[k] for k in ("sparsity_coeff", "seed") if k in header},
        }
        return _typed_cfg(fields, "", not_ckpt), True
    raise not_ckpt("the header has neither 'schema' nor saev 0.1.0's 'd_vit' and 'exp_factor'")


def _typed_cfg(fields: dict, where: str, not_ckpt) -> config.SparseAutoencoderConfig:
    """The header's fields through the one table reader (same words as a bad key in a sweep or pipeline file)."""
    try:
        return from_table(config.SparseAutoencoderConfig(), fields, where.rstrip(".") or "header", "the header")
    except UserError as err:
        raise not_ckpt(str(err).rstrip(".")) from None


def check_trained_layer(
    asked: int, prov: dict, ckpt_path: str, flag: str, override: str, n_blocks: int | None = None
) -> None:
    """Refuse to run an SAE on a layer other than the one its provenance records (compared as blocks of a ViT of
    ``n_blocks`` when known, so -1 and 11 of a 12-block ViT are one layer): its latents would be read off activations
    it never saw. A checkpoint without a recorded layer (saev 0.1.0) is not checked."""
    trained = prov.get("layer")
    if trained is None:
        return

    def block(layer: int) -> int:
        return int(layer) % n_blocks if n_blocks else int(layer)

    if block(asked) != block(trained):
        raise UserError(
            f"{flag}{asked} is not the layer the SAE {ckpt_path} was trained on (layer {trained}); its latents mean "
            f"nothing on another layer's activations. Leave the layer unset (the SAE's own), or pass {override} to "
            "run it there anyway."
        )
