"""Sparse autoencoders: the protocol ``x_hat, f_x, loss = sae(x)`` (``sae``), its variants (``variants``), the
checkpoint file (``checkpoint``), sparse TopK training (``sparse_topk``) and metrics (``metrics``).

The names below keep saev's ``saev_core.nn.load`` / ``saev_core.nn.dump`` and let callers write ``nn.make_sae``
without knowing which module holds what.
"""

from saev_core.nn.checkpoint import CKPT_NAME, SCHEMA, ckpt_file, dump, load, read_provenance
from saev_core.nn.sae import ARCH_NAMES, NOMINAL_DEAD_AFTER_N_PATCHES, Loss, Output, SparseAutoencoder, check_config
from saev_core.nn.variants import (
    ARCHS,
    THRESHOLD_EMA,
    BatchTopKSAE,
    JumpReluSAE,
    ReluDecNormSAE,
    ReluSAE,
    TopKSAE,
    UnitNormDecoder,
    make_sae,
    matryoshka_prefix_sizes,
)

__all__ = [
    "ARCHS",
    "ARCH_NAMES",
    "CKPT_NAME",
    "NOMINAL_DEAD_AFTER_N_PATCHES",
    "SCHEMA",
    "THRESHOLD_EMA",
    "BatchTopKSAE",
    "JumpReluSAE",
    "Loss",
    "Output",
    "ReluDecNormSAE",
    "ReluSAE",
    "SparseAutoencoder",
    "TopKSAE",
    "UnitNormDecoder",
    "check_config",
    "ckpt_file",
    "dump",
    "load",
    "make_sae",
    "matryoshka_prefix_sizes",
    "read_provenance",
]
