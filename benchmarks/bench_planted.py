"""Planted-dictionary benchmark: can an SAE recipe find features that are known to be there?

Writes an activation store of d-dimensional vectors, each the sum of k of n_atoms random unit atoms (coefficients
uniform in [0.5, 1.5]) plus Gaussian noise of standard deviation sigma per dimension, trains a sweep on it in one
pass (the trainer's own code path, as `python -m saev_core train --sweep` runs it), and prints per member:

- recovery: for every atom, the largest cosine with any decoder row; their mean, and the fraction above 0.9;
- held-out L0, NMSE, and the two dead counts (training stream, held-out split);
- beside them, the noise floor (NMSE of the true atoms with the true coefficients: the planted noise's share of the
  variance) and PCA baselines (NMSE of the best linear reconstruction with as many dense components as the
  member's L0, and with k components);
- wall time of the sweep and patches/s;
- then the report's controls (``saev_core.analysis.controls``) beside each member: PCA and the random-decoder control
  at matched L0, k-means (L0 = 1), the gains over each, and the verdict's headline (structure found: at least
  ``config.MIN_GAIN_VS_RANDOM`` less error than the random control and no more than PCA). ``--null`` swaps the
  planted atoms for isotropic Gaussian vectors, where every member should get "no structure found".

Usage (about a minute on 2 CPU cores with the default sweep):

    python benchmarks/bench_planted.py
    python benchmarks/bench_planted.py --sweep my_sweep.toml --lr 1e-3 --n-patches 400000

``--sweep`` takes the same TOML as ``python -m saev_core train --sweep`` (keys: TrainConfig fields, [sae] and
[data] tables, [[sae]] alternatives); unset fields take the trainer's defaults, with d_vit, exp_factor (d_sae =
2 * n_atoms), the store, batch size and run length set here. The default sweep is DEFAULT_SWEEP below.
"""

import argparse
import dataclasses
import os
import tempfile
import time
import tomllib

import numpy as np
import pandas as pd
import torch

from saev_core import config, nn
from saev_core.analysis import controls
from saev_core.store import write_store
from saev_core.store.loader import split_images
from saev_core.train import trainer
from saev_core.train.results import sweep_csv_path
from saev_core.train.sweep import grid

DEFAULT_SWEEP = """
# topk and batchtopk at the planted k and at 2k; relu (saev's recipe) and relu-decnorm at coefficients that give an
# L0 near the planted k on this data; jumprelu with a bandwidth and initial threshold wide enough for the threshold
# to move in a short run (its defaults, 0.001, barely move it: L0 ~28 whatever the coefficient). Loss terms:
# docs/training.md.
[[sae]]
arch = ["topk", "batchtopk"]
k = [4, 8]
[[sae]]
arch = "relu"
sparsity_coeff = [0.02, 0.04]
[[sae]]
arch = "relu-decnorm"
sparsity_coeff = 0.04
[[sae]]
arch = "jumprelu"
sparsity_coeff = 0.1
jumprelu_bandwidth = 0.1
jumprelu_init_threshold = 0.1
"""


@dataclasses.dataclass(frozen=True)
class Planted:
    atoms: np.ndarray
    """[n_atoms, d] unit rows."""
    x: np.ndarray
    """[n, d] float64 vectors (stored as float32)."""
    noise: np.ndarray
    """[n, d] the noise part of each vector."""


def plant_dictionary(n: int, d: int, n_atoms: int, k: int, sigma: float, seed: int = 0) -> Planted:
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    which = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :k]  # k distinct atoms per vector
    coef = rng.uniform(0.5, 1.5, size=(n, k))
    noise = sigma * rng.normal(size=(n, d))
    x = np.einsum("nk,nkd->nd", coef, atoms[which]) + noise
    return Planted(atoms, x, noise)


def recovery(atoms: np.ndarray, w_dec: np.ndarray) -> np.ndarray:
    """Per atom: the largest cosine with any decoder row."""
    w = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True).clip(1e-12)
    return (atoms @ w.T).max(axis=1)


def pca_nmse(train: np.ndarray, test: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """NMSE on ``test`` of the rank-r reconstruction through the mean and top-r principal axes of ``train``."""
    mean = train.mean(axis=0)
    _, _, vt = np.linalg.svd(train - mean, full_matrices=False)
    centred = test - mean
    total = ((test - test.mean(axis=0)) ** 2).sum()
    out = {}
    for r in ranks:
        axes = vt[:r]
        err = centred - centred @ axes.T @ axes
        out[r] = float((err**2).sum() / total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=64, help="vector width (d_vit)")
    parser.add_argument("--n-atoms", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="atoms per vector")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise standard deviation per dimension")
    parser.add_argument("--n-imgs", type=int, default=1600, help="images of --n-tokens vectors each")
    parser.add_argument("--n-tokens", type=int, default=64)
    parser.add_argument("--n-patches", type=int, default=600 * 256, help="training vectors (--n-patches)")
    parser.add_argument("--batch-size", type=int, default=256, help="--sae-batch-size")
    parser.add_argument("--lr", type=float, default=None, help="--lr for every member (default: the trainer's)")
    parser.add_argument("--sweep", default=None, help="a sweep TOML (default: DEFAULT_SWEEP in this file)")
    parser.add_argument("--n-threads", type=int, default=None, help="--n-threads (default: auto)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the planted data")
    parser.add_argument("--keep", default=None, help="write the store and checkpoints here instead of a temp dir")
    parser.add_argument(
        "--null", action="store_true", help="isotropic Gaussian vectors of the same scale instead of planted atoms"
    )
    parser.add_argument("--no-kmeans", action="store_true", help="leave out the k-means control")
    args = parser.parse_args()

    n = args.n_imgs * args.n_tokens
    planted = plant_dictionary(n, args.d, args.n_atoms, args.k, args.sigma, args.seed)
    if args.null:  # no structure: the same per-dimension scale, Gaussian
        gaussian = np.random.default_rng(args.seed).normal(size=planted.x.shape) * planted.x.std()
        planted = dataclasses.replace(planted, x=gaussian, noise=gaussian)
    sweep = tomllib.loads(DEFAULT_SWEEP) if args.sweep is None else tomllib.load(open(args.sweep, "rb"))
    tmp = args.keep or tempfile.mkdtemp(prefix="bench_planted-")
    acts = planted.x.astype(np.float32).reshape(1, args.n_imgs, args.n_tokens, args.d)
    store = write_store(
        os.path.join(tmp, "store"),
        acts,
        cls_token=False,
        imgs_per_shard=args.n_imgs,
        resolved_layers=(10,),
        fingerprint=f"planted-{args.seed}",
    )
    extra = {"lr": args.lr} if args.lr is not None else {}
    if args.n_threads is not None:
        extra["n_threads"] = args.n_threads
    base = config.TrainConfig(
        data=config.DataLoadConfig(shard_root=store.path, layer=-2),
        sae=config.SparseAutoencoderConfig(d_vit=args.d, exp_factor=max(1, 2 * args.n_atoms // args.d)),
        n_patches=args.n_patches,
        sae_batch_size=args.batch_size,
        ckpt_path=os.path.join(tmp, "ckpt"),
        device=args.device,
        log_every=10**9,
        **extra,
    )
    cfgs = grid(base, sweep, source=args.sweep or "DEFAULT_SWEEP")

    t0 = time.perf_counter()
    results = trainer.train_sweep(cfgs, show_progress=False)
    wall = time.perf_counter() - t0

    train_imgs, val_imgs = split_images(store, base.data.val_frac, base.seed)
    x = acts[0].astype(np.float64)
    noise = planted.noise.reshape(args.n_imgs, args.n_tokens, args.d)
    x_train, x_val = x[train_imgs].reshape(-1, args.d), x[val_imgs].reshape(-1, args.d)
    floor = (noise[val_imgs] ** 2).sum() / ((x_val - x_val.mean(axis=0)) ** 2).sum()
    l0s = [r.metrics["l0"] for r in results]
    ranks = sorted({min(args.d, max(1, round(l0))) for l0 in l0s} | {args.k})
    pca = pca_nmse(x_train, x_val, ranks)

    print(
        f"torch {torch.__version__}, device {config.resolve_device(args.device)}, "
        f"{cfgs[0].n_threads or 'auto'} "
        f"CPU threads; {n:,} vectors of d={args.d}: {args.k} of {args.n_atoms} atoms + noise sigma={args.sigma}"
    )
    print(
        f"{len(cfgs)} SAEs (d_sae {base.sae.d_sae}), {args.n_patches:,} patches in batches of {args.batch_size}: "
        f"{wall:.1f} s wall, {args.n_patches / wall:,.0f} patches/s"
    )
    print(f"noise floor NMSE {floor:.4f}; PCA NMSE at rank {args.k}: {pca[args.k]:.4f}\n")
    header = (
        f"{'arch':>12} {'k':>3} {'coeff':>7} {'lr':>7} {'mean max cos':>13} {'atoms>0.9':>10} {'L0':>7} "
        f"{'NMSE':>7} {'PCA@L0':>7} {'dead train':>11} {'dead held-out':>14}"
    )
    print(header)
    sweep_table = pd.read_csv(sweep_csv_path(base.ckpt_path))
    with_controls = controls.sweep_controls(
        sweep_table, store, -2, "patches", base.data.val_frac, base.seed, kmeans=not args.no_kmeans
    ).table.set_index("member_id")
    for r in results:
        sae = nn.load(r.ckpt_path)
        best = recovery(planted.atoms, sae.W_dec.detach().double().numpy())
        m = r.metrics
        dead_train = m.get("frac_dead_train", float("nan"))
        dead_val = m.get("frac_dead_heldout", m.get("frac_dead", float("nan")))
        k = r.cfg.sae.k if r.cfg.sae.arch in ("topk", "batchtopk") else "-"
        coeff = f"{r.cfg.sae.sparsity_coeff:.3g}" if r.cfg.sae.arch not in ("topk", "batchtopk") else "-"
        rank = min(args.d, max(1, round(m["l0"])))
        print(
            f"{r.cfg.sae.arch:>12} {k:>3} {coeff:>7} {r.cfg.lr:>7.1e} {best.mean():>13.3f} "
            f"{(best > 0.9).mean():>10.2f} {m['l0']:>7.2f} {m['nmse']:>7.4f}"
            f" {pca[rank]:>7.4f} {dead_train:>11.1%} {dead_val:>14.1%}"
        )
    print(
        f"\n(recovery: per atom the best cosine with a decoder row; NMSE and L0 on the held-out images; PCA@L0: "
        f"dense PCA with as many components as the member's L0; files in {tmp})\n"
    )
    print("SAE vs the report's controls (saev_core.analysis.controls), gains = how much less error the SAE has:")
    print(
        f"{'member':>12} {'arch':>10} {'k':>3} {'NMSE':>7} {'PCA@L0':>7} {'random@L0':>10} {'k-means':>8} "
        f"{'vs PCA':>7} {'vs random':>10} {'vs k-means':>11}  verdict"
    )
    for r in results:
        row = with_controls.loc[r.member_id]
        k = r.cfg.sae.k if r.cfg.sae.arch in ("topk", "batchtopk") else "-"
        found = row["gain_vs_random"] >= config.MIN_GAIN_VS_RANDOM and row["gain_vs_pca"] >= 0
        print(
            f"{r.member_id:>12} {r.cfg.sae.arch:>10} {k:>3} {row['nmse']:>7.4f} {row['pca_nmse_at_l0']:>7.4f} "
            f"{row['random_nmse_at_l0']:>10.4f} {row.get('kmeans_nmse', float('nan')):>8.4f} "
            f"{row['gain_vs_pca']:>7.0%} {row['gain_vs_random']:>10.0%} "
            f"{row.get('gain_vs_kmeans', float('nan')):>11.0%}"
            f"  {'structure found' if found else 'no structure found'}"
        )


if __name__ == "__main__":
    main()
