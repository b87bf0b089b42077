"""Token modes: which vectors of a store layer an SAE sees.

``patches``: every patch vector of an image (tokens 1.. when the store has a CLS token, all tokens otherwise);
``cls``: token 0; ``meanpool``: the mean of an image's patch tokens. The loader, the statistics and the top-k
visuals all take their vectors from here.
"""

import numpy as np
from jaxtyping import Float

from saev_core.errors import UserError
from saev_core.store import ActivationStore

TOKEN_MODES = ("patches", "cls", "meanpool")


def check_token_mode(store: ActivationStore, patches: str) -> None:
    if patches not in TOKEN_MODES:
        raise UserError(f"--data.patches {patches!r} is not a token mode; use one of {list(TOKEN_MODES)}.")
    if patches == "cls" and not store.metadata["cls_token"]:
        raise UserError(
            f"--data.patches cls needs a CLS token, but the store {store.path} was recorded without one "
            "(--no-cls-token). Use --data.patches patches or --data.patches meanpool."
        )


def first_patch(store: ActivationStore) -> int:
    """The token index of an image's first patch: 1 after a CLS token, else 0."""
    return int(bool(store.metadata["cls_token"]))


def vectors_per_image(store: ActivationStore, patches: str) -> int:
    return store.n_tokens - first_patch(store) if patches == "patches" else 1


def image_vectors(x: Float[np.ndarray, "imgs tokens d"], patches: str, first: int) -> Float[np.ndarray, "imgs d"]:
    """One vector per image: the CLS token or the mean of the patch tokens (float32)."""
    if patches == "cls":
        return x[:, 0].astype(np.float32)
    return np.mean(x[:, first:], axis=1, dtype=np.float32)


def vectors(x: Float[np.ndarray, "imgs tokens d"], patches: str, first: int) -> Float[np.ndarray, "n d"]:
    """The vectors of a token mode for images x, as float32 (patches: image after image, token order)."""
    if patches == "patches":
        return x[:, first:].reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    return image_vectors(x, patches, first)
