"""Controls beside every sweep: what methods without learned sparse structure reconstruct at the same L0.

A trained SAE's NMSE means little alone: random-weight controls come within a few hundredths of trained SAEs on
several interpretability metrics (arXiv 2602.14111). Three controls, each evaluated on the SAEs' own held-out split
with the SAEs' NMSE (``nn.metrics``: sum ||x - x_hat||^2 over sum ||x - mean_val||^2):

- **PCA at matched L0**: the best linear code with round(L0) dense components, fitted on the training split.
- **Random decoder**: d_sae random unit atoms; each vector's support chosen the way TopK does (the L0 atoms with the
  largest projections of the vector, centred on the store's statistics mean, the SAE's own normalisation centre)
  and given least-squares coefficients: the best a dictionary without learning does with that selection.
- **k-means** (L0 = 1): d_sae centroids fitted on training vectors (Lloyd's, ``kmeans_centroids``), each held-out
  vector replaced by its nearest centroid. Run when cheap (``kmeans_cost`` under ``KMEANS_BUDGET``) unless asked for.

``sweep_controls`` adds them to a sweep's table with ``gain_vs_*`` columns: the fraction by which the SAE's NMSE is
below the control's (positive: the SAE reconstructs better).
"""

import dataclasses
import math

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from saev_core import config, threads
from saev_core.analysis.columns import GAINS
from saev_core.store import ActivationStore, loader, stats
from saev_core.store.loader import ActivationLoader
from saev_core.store.shards import ChunkReader, stream_chunks
from saev_core.store.tokens import check_token_mode, first_patch, vectors, vectors_per_image

MAX_CONTROL_VECTORS = 16_384
"""Held-out vectors the controls read at most (the first ones of the held-out stream, seeded)."""
CONTROL_SEED = 0
"""The random atoms' generator: the same control for every member of the same width."""
KMEANS_MAX_ITER = 20
KMEANS_BUDGET = 3e11
"""Multiply-adds (``kmeans_cost``) under which k-means runs by default: about six seconds on 2 CPU cores (the demo's
768 centroids: about 3 s)."""
EXACT_NMSE = 1e-6
"""A control this close to 0 reconstructs exactly: nothing to compare against."""


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


def training_sample(
    store: ActivationStore, layer: int, patches: str, val_frac: float, seed: int, max_vectors: int = MAX_CONTROL_VECTORS
) -> Float[np.ndarray, "n d_vit"]:
    """The first ``max_vectors`` vectors of the SAEs' training stream (what k-means is fitted on)."""
    data = config.DataLoadConfig(shard_root=store.path, layer=layer, patches=patches, val_frac=val_frac)
    train = ActivationLoader(store, data, batch_size=min(4096, max_vectors), seed=seed, split="train")
    return np.concatenate([b.numpy() for b in train.first_batches(-(-max_vectors // train.batch_size))])[:max_vectors]


def random_atoms(d_sae: int, d_vit: int, seed: int = CONTROL_SEED) -> Float[np.ndarray, "d_sae d_vit"]:
    """d_sae unit atoms with Gaussian directions (uniform on the sphere), float64."""
    atoms = np.random.default_rng([seed, d_sae, d_vit]).normal(size=(d_sae, d_vit))
    return atoms / np.linalg.norm(atoms, axis=1, keepdims=True)


def random_decoder_nmse(
    data: HeldOut,
    d_sae: int,
    l0: float | int,
    seed: int = CONTROL_SEED,
    chunk: int = 1024,
    tuner: threads.ThreadTuner | None = None,
) -> float:
    """NMSE of the random-decoder control with ``round(l0)`` atoms per vector (at least 1).

    The least-squares coefficients on a support S solve the normal equations G[S, S] coef = p[S], with G the atoms'
    Gram matrix and p the vector's projections (already computed to choose S): k x k solves instead of a d x k least
    squares per vector (30x faster on CPU). When k >= d_vit the Gram block can be singular and least squares on the
    atoms is used instead."""
    k = max(1, int(round(l0)))
    d_vit = data.x.shape[1]
    atoms = torch.from_numpy(random_atoms(d_sae, d_vit, seed))  # [d_sae, d_vit]
    gram = atoms @ atoms.T  # [d_sae, d_sae]
    x_hat = np.empty(data.x.shape, dtype=np.float64)
    for start in range(0, len(data.x), chunk):
        c = torch.from_numpy(data.x[start : start + chunk].astype(np.float64) - data.center)  # [n, d]
        proj = c @ atoms.T  # [n, d_sae]
        support = proj.topk(min(k, d_sae), dim=1).indices  # [n, k]: TopK's selection
        if support.shape[1] < d_vit:
            g = gram[support.unsqueeze(2), support.unsqueeze(1)]  # [n, k, k]
            coef = torch.linalg.solve(g, proj.gather(1, support).unsqueeze(2))  # [n, k, 1]
        else:
            coef = torch.linalg.lstsq(atoms[support].transpose(1, 2), c.unsqueeze(2)).solution  # [n, k, 1]
        x_hat[start : start + chunk] = (coef.transpose(1, 2) @ atoms[support]).squeeze(1).numpy() + data.center
        if tuner is not None:
            tuner.step_done(len(c))
    return data.nmse(x_hat)


def kmeans_cost(n_vectors: int, n_centroids: int, d: int) -> float:
    """Multiply-adds of fitting k-means: KMEANS_MAX_ITER rounds of distances from every vector to every centroid."""
    return float(n_vectors) * n_centroids * d * KMEANS_MAX_ITER


def kmeans_centroids(
    x: Float[torch.Tensor, "n d_vit"],
    n_centroids: int,
    seed: int = CONTROL_SEED,
    max_iter: int = KMEANS_MAX_ITER,
    tuner: threads.ThreadTuner | None = None,
) -> Float[torch.Tensor, "k d_vit"]:
    """Lloyd's k-means in torch, seeded by k-means++ (Arthur & Vassilvitskii 2007); an emptied centroid moves to the
    vector farthest from its own. In torch rather than scikit-learn because its OpenMP threads spin against other busy
    processes (a 256-centroid fit took 53 s on a loaded 2-core machine, vs 1 s of the same matmuls in torch), and
    torch runs it on the SAEs' device."""
    gen = torch.Generator().manual_seed(seed)
    k = min(n_centroids, len(x))
    centres = x[_kmeans_plus_plus(x, k, gen)].clone()
    sq = (x * x).sum(1)  # [n]
    for _ in range(max_iter):
        dist = sq[:, None] - 2 * x @ centres.T + (centres * centres).sum(1)[None, :]  # [n, k]
        nearest = dist.argmin(1)  # [n]
        counts = torch.bincount(nearest, minlength=k)  # [k]
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)  # [k, d]
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if len(empty):
            far = dist.gather(1, nearest[:, None]).squeeze(1).topk(len(empty)).indices
            moved[empty] = x[far]
        if tuner is not None:
            tuner.step_done()
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def _kmeans_plus_plus(x: Float[torch.Tensor, "n d_vit"], k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared distance to the
    nearest centre so far (k passes of n x d: about one Lloyd round)."""
    sq = (x * x).sum(1)  # [n]
    chosen = [int(torch.randint(len(x), (1,), generator=gen))]  # CPU generator, index used on x's device
    nearest = (sq - 2 * (x @ x[chosen[0]]) + sq[chosen[0]]).clamp(min=0)  # [n]
    for _ in range(1, k):
        total = float(nearest.sum())
        weights = (nearest / total).cpu()  # the generator is a CPU one, whatever the device
        pick = int(torch.multinomial(weights, 1, generator=gen)) if total > 0 else int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, (sq - 2 * (x @ x[pick]) + sq[pick]).clamp(min=0))
    return torch.tensor(chosen, device=x.device)


def kmeans_nmse(
    train_x: Float[np.ndarray, "n d_vit"],
    data: HeldOut,
    n_centroids: int,
    seed: int = CONTROL_SEED,
    tuner: threads.ThreadTuner | None = None,
) -> float:
    """NMSE of k-means with ``n_centroids`` centroids (at most one per training vector) fitted on ``train_x``: each
    held-out vector reconstructed by its nearest centroid (L0 = 1, coefficient 1)."""
    x_fit = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    centres = kmeans_centroids(x_fit, n_centroids, seed, tuner=tuner)
    x = torch.from_numpy(np.ascontiguousarray(data.x, dtype=np.float32))
    nearest = torch.cdist(x, centres).argmin(1)
    return data.nmse(centres[nearest].double().numpy())


@dataclasses.dataclass(frozen=True)
class PCABaseline:
    """Held-out NMSE of PCA with k components, fitted on the training split (k = 1..d_vit)."""

    nmse: Float[np.ndarray, " d_vit"]
    """nmse[k - 1]: the baseline at k components."""

    def at(self, l0: float | int) -> float:
        """The baseline at matched L0 (k = round(L0), at least 1)."""
        k = min(max(1, round(l0)), len(self.nmse))
        return float(self.nmse[k - 1])


def _scatter_matrix(store: ActivationStore, layer: int, patches: str, images: np.ndarray, center: np.ndarray | None):
    """(sum of vectors, count, sum of (x - c)(x - c)^T) over the token mode's vectors of ``images``, float64;
    c = ``center`` or 0."""
    ipc, first = store.layout.imgs_per_chunk, first_patch(store)
    chunks, starts = np.unique(images // ipc, return_index=True)
    d = store.d_vit
    total, n, scatter = np.zeros(d), 0, np.zeros((d, d))
    c = np.zeros(d) if center is None else center
    reader = ChunkReader(store.array(layer))
    for chunk, imgs, x in stream_chunks(reader, chunks, np.split(images, starts[1:]), ipc, store.n_imgs):
        v = vectors(x[imgs - chunk * ipc], patches, first).astype(np.float64) - c
        total += v.sum(0) + len(v) * c
        n += len(v)
        scatter += v.T @ v
    return total, n, scatter


def pca_baseline(
    store: ActivationStore, layer: int, patches: str, val_frac: float, seed: int, max_vectors: int = 200_000
) -> PCABaseline:
    """PCA fitted on the training split of the SAEs' own train/val split (``loader.split_images``), evaluated on the
    held-out split with the same NMSE definition as the SAEs' (``metrics``): sum ||x - x_hat||^2 over
    sum ||x - mean_val||^2. Each split reads at most about ``max_vectors`` vectors (a uniform, seeded sample of its
    images)."""
    check_token_mode(store, patches)
    train, val = loader.split_images(store, val_frac, seed)
    per_img = vectors_per_image(store, patches)
    rng = np.random.default_rng(seed)

    def sample(images: np.ndarray) -> np.ndarray:
        cap = max(1, max_vectors // per_img)
        return np.sort(rng.choice(images, cap, replace=False)) if len(images) > cap else images

    train, val = sample(train), sample(val)
    total, n, _ = _scatter_matrix(store, layer, patches, train, None)
    mean = total / n
    _, _, cov = _scatter_matrix(store, layer, patches, train, mean)
    eigvals, eigvecs = np.linalg.eigh(cov)
    components = eigvecs[:, np.argsort(eigvals)[::-1]]  # [d, d], columns by decreasing variance
    val_total, n_val, val_scatter = _scatter_matrix(store, layer, patches, val, mean)  # around the train mean
    val_mean = val_total / n_val
    # sum ||x - mean_val||^2 = sum ||x - mean||^2 - n ||mean_val - mean||^2
    denom = float(np.trace(val_scatter)) - n_val * float((val_mean - mean) @ (val_mean - mean))
    # residual of the k-component reconstruction: trace(S) - sum_{i<k} p_i^T S p_i, S the scatter around the mean
    explained = np.cumsum(np.einsum("di,de,ei->i", components, val_scatter, components))
    return PCABaseline((float(np.trace(val_scatter)) - explained) / denom)


def gain(nmse: float, control: float) -> float:
    """The fraction by which the SAE's NMSE is below the control's (negative: the SAE is worse); NaN when either is
    not finite or the control is (nearly) exact: at L0 >= d_vit PCA and random atoms span everything, and no
    comparison is left."""
    if not (nmse == nmse and control == control and control > EXACT_NMSE) or np.isinf(nmse) or np.isinf(control):
        return math.nan
    return (control - nmse) / control


@dataclasses.dataclass(frozen=True)
class SweepControls:
    table: pd.DataFrame
    """The sweep's table with the control columns (``GAINS`` keys) and their ``gain_vs_*`` columns."""
    pca: PCABaseline | None
    notes: list[str]
    """Controls left out and why, in words the report prints."""


def sweep_controls(
    table: pd.DataFrame,
    store: ActivationStore,
    layer: int,
    patches: str,
    val_frac: float,
    seed: int,
    *,
    pca: bool = True,
    random: bool = True,
    kmeans: bool | None = None,
    pca_max_vectors: int = 200_000,
    n_threads: int | None = None,
) -> SweepControls:
    """Every control for every member of a sweep (rows as in sweep.csv: ``l0``, ``nmse``, ``sae.d_vit``,
    ``sae.exp_factor``), on the split the members were evaluated on. ``kmeans``: None runs it when
    ``kmeans_cost`` is under ``KMEANS_BUDGET``. CPU threads: ``n_threads``, or the timed rule of
    ``saev_core.threads``."""
    table = table.copy()
    split = (store, layer, patches, val_frac, seed)
    widths = [int(d * e) for d, e in zip(table["sae.d_vit"], table["sae.exp_factor"])]
    baseline = pca_baseline(*split, pca_max_vectors) if pca else None
    notes = []
    if baseline is not None:
        table["pca_nmse_at_l0"] = [baseline.at(l0) if l0 == l0 else math.nan for l0 in table["l0"]]
    data = held_out(*split) if random or kmeans is not False else None
    tuner = threads.tuner_for(n_threads, "cpu")
    if random:
        with threads.apply(tuner):
            table["random_nmse_at_l0"] = [
                random_decoder_nmse(data, w, l0, tuner=tuner) if l0 == l0 else math.nan
                for w, l0 in zip(widths, table["l0"])
            ]
    if kmeans is not False:
        n_fit = min(
            MAX_CONTROL_VECTORS, len(loader.split_images(store, val_frac, seed)[0]) * vectors_per_image(store, patches)
        )
        cost = max(kmeans_cost(n_fit, w, store.d_vit) for w in widths)
        if kmeans or cost <= KMEANS_BUDGET:
            train_x = training_sample(*split)
            with threads.apply(tuner):
                by_width = {w: kmeans_nmse(train_x, data, w, tuner=tuner) for w in sorted(set(widths))}
            table["kmeans_nmse"] = [by_width[w] for w in widths]
        else:
            notes.append(
                f"k-means left out: fitting {max(widths)} centroids to {n_fit:,} vectors costs about "
                f"{cost / 5e10:.0f} s on 2 CPU cores (set [report] kmeans = true to run it)."
            )
    for control, column in GAINS.items():
        if control in table:
            table[column] = [gain(n, c) for n, c in zip(table["nmse"], table[control])]
    return SweepControls(table, baseline, notes)
