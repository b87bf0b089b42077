"""The probe job: SAE checkpoint + a store with patch labels -> the SAE and its controls as encoders -> one pass
(``probes.probe_pass``) -> ``<dump_to>/probe.json``. ``python -m saev_core probe`` and the ``probe_metrics`` Dagster
asset both call ``run_probes``.

Controls, each probed exactly like the SAE (docs/probes.md):

- ``pca``: the projections of the SAE-normalised vector, centred on the calibration mean, on the top
  min(d_sae, d_vit) principal directions of the calibration sample (signed; the probe's weight picks the sign).
- ``random``: the random-decoder control of ``analysis.controls`` (its d_sae random unit atoms) as a TopK encoder:
  each vector keeps its round(L0) largest projections (the SAE's own L0 on the calibration sample), the rest 0.
- ``kmeans``: k-means (k = min(256, d_sae); ``controls.kmeans_centroids`` on at most 8,192 calibration vectors) on the
  normalised calibration sample; latent j of a vector is minus its squared distance to centroid j.

The **calibration sample** (at most ``CALIBRATION_VECTORS`` labelled patches of training images drawn with the
split's seed) sets each encoder's bins and fits PCA and k-means; nothing of the held-out split is seen before
evaluation.
"""

import csv
import dataclasses
import logging
import math
import os

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saev_core import config, nn
from saev_core.analysis import controls, probes
from saev_core.errors import UserError
from saev_core.files import atomic_write_json, check_output_folder
from saev_core.nn import trained_on
from saev_core.store import ActivationStore
from saev_core.store.loader import split_images

logger = logging.getLogger("saev_core.analysis.probe_run")
CALIBRATION_VECTORS = 16_384
KMEANS_CLUSTERS = 256
KMEANS_ITERS = 20
KMEANS_FIT_VECTORS = 8192
DEFAULT_VAL_FRAC = config.DataLoadConfig().val_frac
PATCHES_ONLY = trained_on.TokenModeRule(
    ("patches",), "; patch probes need an SAE trained on patches (--data.patches patches).", default="patches"
)
"""Patch probes read patch latents: an SAE trained on CLS or mean-pooled vectors has none."""


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What a probe run made; the CLI prints ``path`` last and the Dagster asset reports the numbers."""

    path: str
    sae: probes.ProbeMetrics
    controls: dict[str, probes.ProbeMetrics]


@dataclasses.dataclass(frozen=True)
class ProbeInputs:
    sae: nn.SparseAutoencoder
    ckpt_path: str
    store: ActivationStore
    layer: int
    val_frac: float
    seed: int


def resolve_inputs(cfg: config.ProbeConfig, device: str) -> ProbeInputs:
    """The SAE, its store and layer, and its train/val split (flags first, then the checkpoint)."""
    found = trained_on.resolve(cfg.ckpt, device, cfg.data.shard_root, cfg.data.layer, None, PATCHES_ONLY)
    val_frac, seed = _split_settings(found.ckpt_path, found.provenance, cfg.data)
    return ProbeInputs(found.sae, found.ckpt_path, found.store, found.layer, val_frac, seed)


def _split_settings(ckpt_path: str, prov: dict, data: config.ProbeDataConfig) -> tuple[float, int]:
    """(val_frac, seed) of the SAE's own split: the flags, else its row of the sweep.csv beside its folder and its
    provenance's data seed, else the training defaults (logged)."""
    row = {}
    sweep_csv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path))), "sweep.csv")
    if os.path.isfile(sweep_csv):
        with open(sweep_csv, newline="") as f:
            mine = os.path.abspath(ckpt_path)
            row = next((r for r in csv.DictReader(f) if os.path.abspath(r.get("ckpt") or "") == mine), {})
    val_frac = data.val_frac if data.val_frac is not None else float(row.get("data.val_frac") or DEFAULT_VAL_FRAC)
    seed = (
        data.seed if data.seed is not None else int(prov.get("data_seed", row.get("seed") or config.TrainConfig.seed))
    )
    if data.val_frac is None and not row:
        logger.warning("no sweep.csv row for %s: holding out val_frac=%g (pass --data.val-frac)", ckpt_path, val_frac)
    return val_frac, seed


# ----------------------------------------------------------------------------------------------------------------
# The calibration sample and the encoders
# ----------------------------------------------------------------------------------------------------------------


def calibration_vectors(
    store: ActivationStore, layer: int, labels: np.ndarray, train: np.ndarray, seed: int, n_max: int
) -> Float[np.ndarray, "n d_vit"]:
    """At most ``n_max`` labelled patches of training images (images drawn at random with ``seed``)."""
    counts = (labels[train] > 0).sum(axis=1)
    order = np.random.default_rng([seed, 21]).permutation(len(train))
    n_imgs = int(np.searchsorted(np.cumsum(counts[order]), n_max)) + 1
    chosen = train[order[:n_imgs]]
    xs = [x for _, x, _ in probes.labelled_patches(store, layer, labels, chosen)]
    if not xs or sum(map(len, xs)) == 0:
        raise UserError(f"The training images of {store.path} have no labelled patch; nothing to fit probes on.")
    return np.concatenate(xs)[:n_max]


def _batched(encode: probes.Encode, x: Tensor, batch: int = 2048) -> list[Tensor]:
    return [encode(x[i : i + batch]) for i in range(0, len(x), batch)]


def pca_encoder(sae: nn.SparseAutoencoder, x: Float[Tensor, "n d_vit"]) -> probes.Encode:
    """Projections on the top min(d_sae, d_vit) principal directions of the normalised sample."""
    x_n = sae.normalize(x).double()
    mean = x_n.mean(0)
    eigvals, eigvecs = torch.linalg.eigh((x_n - mean).T @ (x_n - mean))
    comps = eigvecs[:, torch.argsort(eigvals, descending=True)[: min(sae.cfg.d_sae, sae.cfg.d_vit)]].float()
    mean = mean.float()
    return lambda v: (sae.normalize(v) - mean) @ comps


def random_encoder(sae: nn.SparseAutoencoder, l0: float) -> probes.Encode:
    """The random-decoder control's atoms (``controls.random_atoms``) as a TopK encoder of round(l0) latents."""
    atoms = torch.from_numpy(controls.random_atoms(sae.cfg.d_sae, sae.cfg.d_vit)).float().to(sae.W_enc.device)
    k = min(sae.cfg.d_sae, max(1, round(l0)))

    def encode(v: Tensor) -> Tensor:
        proj = sae.normalize(v) @ atoms.T
        top = proj.topk(k, dim=1)
        return torch.zeros_like(proj).scatter_(1, top.indices, top.values)

    return encode


def kmeans_encoder(sae: nn.SparseAutoencoder, x: Float[Tensor, "n d_vit"], seed: int) -> probes.Encode:
    """Minus the squared distance of the normalised vector to each of k centroids fitted on the sample."""
    x_n = sae.normalize(x)
    gen = torch.Generator().manual_seed(seed)
    sample = x_n[torch.randperm(len(x_n), generator=gen)[:KMEANS_FIT_VECTORS].to(x_n.device)]
    k = max(1, min(KMEANS_CLUSTERS, sae.cfg.d_sae, len(sample)))
    c = controls.kmeans_centroids(sample, k, seed, max_iter=KMEANS_ITERS)  # the report's k-means, on this sample
    c_sq = (c * c).sum(1)

    def encode(v: Tensor) -> Tensor:
        v_n = sae.normalize(v)
        return -((v_n * v_n).sum(1, keepdim=True) - 2 * v_n @ c.T + c_sq)

    return encode


def build_encoders(
    sae: nn.SparseAutoencoder, x: Float[Tensor, "n d_vit"], names: tuple[str, ...], n_bins: int, seed: int
) -> dict[str, tuple[probes.Encode, Tensor]]:
    """The SAE and the named controls, each with its bin edges from the calibration sample ``x``."""
    encoders: dict[str, probes.Encode] = {"sae": sae.encode}
    l0 = math.nan
    for name in names:
        if name == "pca":
            encoders[name] = pca_encoder(sae, x)
        elif name == "random":
            l0 = float(torch.cat([(f != 0).sum(1) for f in _batched(sae.encode, x)]).double().mean())
            encoders[name] = random_encoder(sae, l0)
        elif name == "kmeans":
            encoders[name] = kmeans_encoder(sae, x, seed)
        else:
            raise UserError(f"--controls {name!r} is not a control; use any of {', '.join(config.PROBE_CONTROLS)}.")
    out = {}
    for name, encode in encoders.items():
        lat, val = [], []
        for f in _batched(encode, x):
            rows, cols = f.nonzero(as_tuple=True)
            lat.append(cols)
            val.append(f[rows, cols])
        width = f.shape[1]
        out[name] = (encode, probes.bin_edges(torch.cat(lat), torch.cat(val), width, n_bins))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------


def probe_path(dump_to: str) -> str:
    return os.path.join(dump_to, "probe.json")


@torch.inference_mode()
def run_probes(cfg: config.ProbeConfig, show_progress: bool = True) -> ProbeResult:
    """Fit and evaluate the probes of one checkpoint and its controls; write ``<dump_to>/probe.json`` atomically."""
    check_output_folder(cfg.dump_to, "--dump-to")
    device = config.resolve_device(cfg.device)
    inputs = resolve_inputs(cfg, device)
    store = inputs.store
    labels = store.patch_labels()  # the only reads of the store's labels
    names = store.patch_class_names
    probes.check_labels(store, labels, names)
    train, val = split_images(store, inputs.val_frac, inputs.seed)
    x = calibration_vectors(store, inputs.layer, labels, train, inputs.seed, CALIBRATION_VECTORS)
    encoders = build_encoders(inputs.sae, torch.from_numpy(x).to(device), cfg.controls, cfg.n_bins, inputs.seed)
    data = probes.probe_pass(
        store, inputs.layer, labels, len(names) - 1, train, val, encoders, cfg.k, device, show_progress=show_progress
    )
    metrics = {
        name: probes.evaluate(name, d, probes.fit_probes(d), names[1:], cfg.k, cfg.tau) for name, d in data.items()
    }
    sae_metrics = metrics.pop("sae")
    doc = {
        "ckpt": os.path.abspath(inputs.ckpt_path),
        "store": store.path,
        "store_key": store.metadata.get("key"),
        "layer": inputs.layer,
        "val_frac": inputs.val_frac,
        "seed": inputs.seed,
        "n_bins": cfg.n_bins,
        "unlabelled": "excluded",
        "n_train_images": len(train),
        "n_val_images": len(val),
        "calibration_vectors": len(x),
        **sae_metrics.as_dict(),
        "controls": {name: m.as_dict() for name, m in metrics.items()},
    }
    path = atomic_write_json(probe_path(cfg.dump_to), _finite(doc))
    return ProbeResult(path, sae_metrics, metrics)


def _finite(obj):
    """NaN -> None throughout, so probe.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
