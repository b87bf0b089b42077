"""An SAE and the store layer it was trained on: the flags first, then what its checkpoint's provenance records.

The visuals and probe jobs both start here, so both say the same thing about a checkpoint that names no store, a
token mode the job cannot use, a store of another width, or a layer the SAE was not trained on; a saev 0.1.0 file
(no normalisation saved) gets the store's, as saev trained it."""

import dataclasses
import logging
from collections.abc import Collection

from saev_core.errors import UserError
from saev_core.nn.checkpoint import check_trained_layer, ckpt_file, load
from saev_core.nn.sae import SparseAutoencoder
from saev_core.store import ActivationStore, stats

logger = logging.getLogger("saev_core.nn.trained_on")


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """The loaded SAE and what it reads."""

    sae: SparseAutoencoder
    ckpt_path: str
    """The checkpoint file (``ckpt_file``: a member's folder names its ``sae.pt``)."""
    store: ActivationStore
    layer: int
    """The store's recorded layer key (``store.recorded_layer``), whatever form the flag or provenance gave."""
    token_mode: str
    provenance: dict


@dataclasses.dataclass(frozen=True)
class TokenModeRule:
    """Which token modes a job accepts, and what it tells the user about another."""

    accepted: Collection[str]
    refusal: str
    """Said after "The SAE <ckpt> was trained on <mode> vectors": why not, and which flag to pass."""
    default: str | None = None
    """The mode of a checkpoint whose provenance records none; None: the mode is a missing flag."""


def resolve(
    ckpt: str,
    device: str,
    shard_root: str | None,
    layer: int | None,
    token_mode: str | None,
    rule: TokenModeRule,
    *,
    missing_hint: str = "",
    check_layer_flag: bool = False,
) -> TrainedOn:
    """Load the SAE at ``ckpt`` on ``device`` and open its store layer. ``shard_root``, ``layer`` and ``token_mode``
    are the flags (None: unset), each falling back to the checkpoint's provenance. One ``UserError`` names every
    flag still missing (then ``missing_hint``). ``check_layer_flag``: a ``--data.layer`` flag must be the layer the
    SAE was trained on (``check_trained_layer``)."""
    sae = load(ckpt, device=device)
    ckpt_path = ckpt_file(ckpt)
    prov = sae.provenance
    shard_root = shard_root or prov.get("store")
    layer_flag, layer = layer, layer if layer is not None else prov.get("layer")
    token_mode = token_mode or prov.get("token_mode", rule.default)
    named = [("--data.shard-root", shard_root), ("--data.layer", layer)]
    named += [("--data.patches", token_mode)] if rule.default is None else []
    missing = [flag for flag, value in named if value is None]
    if missing:
        raise UserError(
            f"The checkpoint {ckpt_path} does not say which activations it was trained on (a saev 0.1.0 file, or one "
            f"from elsewhere); pass {', '.join(missing)}{missing_hint}."
        )
    if token_mode not in rule.accepted:
        raise UserError(f"The SAE {ckpt_path} was trained on {token_mode} vectors{rule.refusal}")
    store = ActivationStore.open(shard_root)
    if store.d_vit != sae.cfg.d_vit:
        raise UserError(
            f"The SAE {ckpt_path} reads {sae.cfg.d_vit}-d activations but the store {shard_root} holds "
            f"{store.d_vit}-d ones; pass the store the SAE was trained on (--data.shard-root)."
        )
    recorded = store.recorded_layer(layer)
    if check_layer_flag and layer_flag is not None:
        n_blocks = store.metadata.n_blocks_in_vit
        check_trained_layer(layer_flag, prov, ckpt_path, "--data.layer ", "--allow-layer-mismatch", n_blocks)
    if sae.saved_no_normalization:
        stats.set_store_normalization(sae, store, recorded, token_mode)
        logger.info(
            "%s carries no normalisation: using the store's (scale_mean, scale_norm), as saev 0.1.0 trained", ckpt_path
        )
    return TrainedOn(sae, ckpt_path, store, recorded, token_mode, prov)
