"""Seed consistency: does retraining the chosen SAE from another initialisation find the same dictionary?

Decoder atoms of the two runs are paired one-to-one by the Hungarian method (scipy's ``linear_sum_assignment``) on
their cosine similarities, maximising the total; the mean matched cosine is the score (the pairwise mean max cosine
of arXiv 2505.20254, with a one-to-one matching so one atom cannot stand in for many). 1 means the same atoms
(up to order); unit atoms drawn at random in d dimensions match at about sqrt(2 log(d_sae) / d).
"""

import dataclasses

import numpy as np
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment


@dataclasses.dataclass(frozen=True)
class SeedConsistency:
    other_seed: int
    """The ``sae.seed`` of the retrained run (the data, split and order are the chosen member's)."""
    mean_cos: float
    """Mean cosine of the Hungarian-matched decoder atoms."""
    frac_above_0_9: float
    """Matched pairs with cosine above 0.9."""
    other_ckpt: str


def matched_cosines(
    w_a: Float[np.ndarray, "d_sae d_vit"], w_b: Float[np.ndarray, "d_sae_b d_vit_b"]
) -> Float[np.ndarray, " n_pairs"]:
    """Cosines of the one-to-one pairing of the rows of ``w_a`` and ``w_b`` with the largest total cosine
    (min(d_sae, d_sae_b) pairs). Zero rows have cosine 0 with everything."""
    a = np.asarray(w_a, dtype=np.float64)
    b = np.asarray(w_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"decoders must be [d_sae, d_vit] of the same d_vit, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    cos = a @ b.T  # [d_sae, d_sae_b]
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return cos[rows, cols]


def consistency(w_a: np.ndarray, w_b: np.ndarray, other_seed: int, other_ckpt: str) -> SeedConsistency:
    cos = matched_cosines(w_a, w_b)
    return SeedConsistency(other_seed, float(cos.mean()), float((cos > 0.9).mean()), other_ckpt)
