"""Patch classes in the gallery: a member's ``probe.json`` (``python -m saev_core probe``, docs/probes.md) read for
the page's "patch probes" section, and the outline of a class's patches drawn over a latent's heatmaps when the
store has per-patch labels (docs/store-format.md).

Which class a latent's heatmaps outline: the class the probe found it best for (highest AP first), else the
commonest labelled class under the latent's top patch in its rendered images. The outline is geometry only (an SVG
path in the rendered picture's pixels): the page draws it over the heatmap and the original, and it can be hidden.
"""

import dataclasses
import logging
import math
import os

import numpy as np
from jaxtyping import Bool, Float, Int

from saev_core.errors import UserError
from saev_core.files import read_json

logger = logging.getLogger("saev_core.visuals.patch_classes")

PROBE_FILE = os.path.join("probes", "probe.json")
"""Where the pipeline's probe stage writes a member's probe.json, relative to its checkpoint folder."""


@dataclasses.dataclass(frozen=True)
class ProbeView:
    """What the gallery shows of a probe.json: the file, its summary and its per-class rows."""

    path: str
    doc: dict
    """probe.json as read (strict JSON; numbers that could not be computed are None)."""

    @property
    def classes(self) -> list[dict]:
        return list(self.doc.get("classes") or [])

    def best_latents(self) -> list[int]:
        """Every class's best latent, in class order, once each."""
        return list(dict.fromkeys(int(c["best_latent"]) for c in self.classes if c.get("best_latent") is not None))

    def classes_of(self, latent: int) -> list[dict]:
        """The classes whose best latent this is, highest AP first (None AP last)."""
        mine = [c for c in self.classes if c.get("best_latent") == latent]
        return sorted(mine, key=lambda c: -math.inf if c.get("ap") is None else -c["ap"])


def default_probe_path(ckpt_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), PROBE_FILE)


def load_probe(path: str | None, ckpt_path: str, store_key: str, layer: int, d_sae: int) -> ProbeView | None:
    """The probe.json to show: ``path`` when given (a mismatch is a UserError), else the one the probe stage wrote
    beside the checkpoint when there is one (a mismatch there is logged and the file left out)."""
    explicit = path is not None
    path = path if explicit else default_probe_path(ckpt_path)
    if not os.path.isfile(path):
        if explicit:
            raise UserError(f"--probe {path} does not exist; run `python -m saev_core probe` first, or leave it out.")
        return None
    try:
        doc = read_json(path)
    except (ValueError, OSError) as err:
        doc = f"unreadable ({err})"
    problems = []
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list):
        problems.append("it is not a probe.json (no list of classes)")
    else:
        if doc.get("store_key") != store_key:
            problems.append(f"it was fitted on the store {doc.get('store_key')!r}, these visuals use {store_key!r}")
        if doc.get("layer") != layer:
            problems.append(f"it was fitted on layer {doc.get('layer')!r}, these visuals show layer {layer}")
        bad = [c.get("best_latent") for c in doc["classes"] if not _latent_id(c.get("best_latent"), d_sae)]
        if bad:
            problems.append(f"its best latents {bad[:5]} are not latents of this SAE (0..{d_sae - 1})")
    if problems:
        message = f"The probe file {path} does not belong to these visuals: {'; '.join(problems)}."
        if explicit:
            raise UserError(message + " Pass the probe.json of this checkpoint (--probe), or leave it out.")
        logger.warning("%s It is left out of the gallery.", message)
        return None
    return ProbeView(path, doc)


def _latent_id(value, d_sae: int) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < d_sae)


def outline_class(
    latent: int,
    probe: ProbeView | None,
    top_patches: Float[np.ndarray, "n n_patches"],
    patch_labels: Int[np.ndarray, "n n_patches"],
    class_names: list[str],
) -> tuple[int, str] | None:
    """(class index in ``class_names``, why) of the class to outline on a latent's ``n`` rendered images: the
    probe's class when the probe found the latent best for one, else the commonest labelled class under its top
    patch in those images; None when neither exists."""
    for row in probe.classes_of(latent) if probe else []:
        if row.get("class") in class_names[1:]:
            return class_names.index(row["class"], 1), "probe"
    if not len(top_patches):
        return None
    under_top = patch_labels[np.arange(len(top_patches)), np.argmax(top_patches, axis=1)]
    under_top = under_top[under_top > 0]
    if not under_top.size:
        return None
    return int(np.bincount(under_top).argmax()), "top patches"


def outline_path(mask: Bool[np.ndarray, "rows cols"], box: tuple[float, float, float, float]) -> str:
    """SVG path data of the border of the patches in ``mask`` (row-major grid over ``box``, in picture pixels):
    one segment per patch side whose neighbour is outside the mask (or outside the grid), ``M x y h dx`` or
    ``M x y v dy``. Empty when no patch is in the mask."""
    rows, cols = mask.shape
    left, top, right, bottom = box
    xs = left + (right - left) * np.arange(cols + 1) / cols
    ys = top + (bottom - top) * np.arange(rows + 1) / rows
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    parts = []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        for r, c in zip(*np.nonzero(inner & ~neighbour)):
            if dr:  # a horizontal side: the top (dr = -1) or bottom edge of the patch
                y = ys[r] if dr < 0 else ys[r + 1]
                parts.append(f"M{xs[c]:.1f} {y:.1f}h{xs[c + 1] - xs[c]:.1f}")
            else:
                x = xs[c] if dc < 0 else xs[c + 1]
                parts.append(f"M{x:.1f} {ys[r]:.1f}v{ys[r + 1] - ys[r]:.1f}")
    return "".join(parts)
