"""Controls beside every sweep: what a dictionary with no learned structure reconstructs at the same L0.

A trained SAE's NMSE means little alone: random-weight controls come within a few hundredths of trained SAEs on
several interpretability metrics (arXiv 2602.14111). The **random-decoder control** has d_sae random unit atoms,
chooses each vector's support the way TopK does (the L0 atoms with the largest projections of the centred vector)
and gives them least-squares coefficients: the best a dictionary without learning does with that selection. It is
evaluated on the SAEs' own held-out split with the SAEs' NMSE (``nn.metrics``): sum ||x - x_hat||^2 over
sum ||x - mean_val||^2, the vectors centred on the store's statistics mean (the SAE's own normalisation centre).
PCA at matched L0 is in ``report``.
"""

import dataclasses

import numpy as np
import torch
from jaxtyping import Float

from saev_core import config
from saev_core.store import ActivationStore, stats
from saev_core.store.loader import ActivationLoader

MAX_CONTROL_VECTORS = 16_384
"""Held-out vectors the controls read at most (the first ones of the held-out stream, seeded)."""
CONTROL_SEED = 0
"""The random atoms' generator: the same control for every member of the same width."""


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The held-out vectors the controls reconstruct, and the centre they are reconstructed around."""

    x: Float[np.ndarray, "n d_vit"]
    center: Float[np.ndarray, " d_vit"]

    def nmse(self, x_hat: Float[np.ndarray, "n d_vit"]) -> float:
        """The SAEs' NMSE (float64): sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
        x = self.x.astype(np.float64)
        return float(((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum())


def held_out(
    store: ActivationStore, layer: int, patches: str, val_frac: float, seed: int, max_vectors: int = MAX_CONTROL_VECTORS
) -> HeldOut:
    """The first ``max_vectors`` vectors of the SAEs' held-out stream (same split, seed and token mode)."""
    data = config.DataLoadConfig(shard_root=store.path, layer=layer, patches=patches, val_frac=val_frac)
    loader = ActivationLoader(store, data, batch_size=min(4096, max_vectors), seed=seed, split="val")
    batches = loader.first_batches(-(-max_vectors // loader.batch_size))
    mean, _ = stats.raw_stats(store, layer, patches)
    return HeldOut(np.concatenate([b.numpy() for b in batches])[:max_vectors], np.asarray(mean, dtype=np.float64))


def random_atoms(d_sae: int, d_vit: int, seed: int = CONTROL_SEED) -> Float[np.ndarray, "d_sae d_vit"]:
    """d_sae unit atoms with Gaussian directions (uniform on the sphere), float64."""
    atoms = np.random.default_rng([seed, d_sae, d_vit]).normal(size=(d_sae, d_vit))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def random_decoder_nmse(
    data: HeldOut, d_sae: int, l0: float | int, seed: int = CONTROL_SEED, chunk: int = 1024
) -> float:
    """NMSE of the random-decoder control with ``round(l0)`` atoms per vector (at least 1)."""
    k = max(1, int(round(l0)))
    atoms = torch.from_numpy(random_atoms(d_sae, data.x.shape[1], seed))
    x_hat = np.empty(data.x.shape, dtype=np.float64)
    for start in range(0, len(data.x), chunk):
        c = torch.from_numpy(data.x[start : start + chunk].astype(np.float64) - data.center)  # [n, d]
        support = (c @ atoms.T).topk(min(k, d_sae), dim=1).indices  # [n, k]: TopK's selection
        basis = atoms[support].transpose(1, 2)  # [n, d, k]
        coef = torch.linalg.lstsq(basis, c.unsqueeze(2)).solution  # [n, k, 1]
        x_hat[start : start + chunk] = (basis @ coef).squeeze(2).numpy() + data.center
    return data.nmse(x_hat)
