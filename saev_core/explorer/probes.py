"""A member's patch probes as the explorer shows them: ``<its checkpoint folder>/probes/probe.json`` (written by
``python -m saev_core probe``; docs/probes.md) seen per latent, and its rows in words."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxtyping import Float, Int


@dataclasses.dataclass(frozen=True)
class PatchProbes:
    """A member's patch probes (``<member folder>/probes/probe.json``, written by ``python -m saev_core probe``;
    docs/probes.md): each class's best latent with its held-out AP and Purity@k, seen per latent."""

    path: str
    classes: list[dict]
    """probe.json's per-class rows (``class``, ``best_latent``, ``ap``, ``purity_at_k``, ``weight``, ...)."""
    k: int | None
    best_ap: Float[np.ndarray, " d_sae"]
    """Per latent: the highest AP among the classes whose best latent it is; NaN for a latent that is no class's
    best latent (or whose classes have no AP)."""
    best_row: Int[np.ndarray, " d_sae"]
    """The index into ``classes`` of that class (-1 where ``best_ap`` is NaN)."""

    @classmethod
    def from_doc(cls, path: str, doc: dict, d_sae: int) -> PatchProbes:
        rows = [r for r in doc.get("classes") or [] if isinstance(r, dict)]
        best_ap, best_row = np.full(d_sae, np.nan), np.full(d_sae, -1, dtype=np.int64)
        for i, row in enumerate(rows):  # file order: among equal APs the class listed first wins
            j, ap = row.get("best_latent"), row.get("ap")
            if isinstance(j, int) and 0 <= j < d_sae and isinstance(ap, (int, float)) and not ap <= best_ap[j]:
                best_ap[j], best_row[j] = float(ap), i
        return cls(path, rows, doc.get("k"), best_ap, best_row)

    def rows_of(self, latent: int) -> list[dict]:
        """The classes whose best latent this is, in file order."""
        return [r for r in self.classes if r.get("best_latent") == latent]


def probes_path(ckpt: str) -> str:
    """Where a member's patch probes are: ``<its checkpoint folder>/probes/probe.json`` (the pipeline's [probe]
    stage; ``python -m saev_core probe --dump-to <that folder>`` by hand)."""
    return os.path.join(os.path.dirname(ckpt), "probes", "probe.json")


def probe_words(row: dict, k: int | None) -> str:
    """One class row of probe.json in words: "sky: AP 0.80, Purity@100 0.97"."""
    purity = row.get("purity_at_k")
    words = f"{row.get('class')}: AP {row['ap']:.2f}"
    if isinstance(purity, (int, float)):
        words += f", Purity@{k or 'k'} {purity:.2f}"
    if isinstance(row.get("weight"), (int, float)) and row["weight"] < 0:
        words += " (inverse: the class is where this latent is low)"
    return words


def format_ap(row: dict) -> str:
    """ "sky (0.80)"; a negative probe weight (the class is where the latent is low) says "inverse"."""
    weight = row.get("weight")
    inverse = ", inverse" if isinstance(weight, (int, float)) and weight < 0 else ""
    return f"{row.get('class')} ({row['ap']:.2f}{inverse})"
