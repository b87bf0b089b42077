"""The report's verdict on two planted stores: sparse atoms (the SAE must find them and say so) and isotropic
Gaussian noise (no structure: the SAE must not be credited with any), trained the real way (one sweep pass)."""

import os

import numpy as np
import pandas as pd
import pytest

from saev_core import config, nn
from saev_core.analysis import controls, report
from saev_core.store import write_store
from saev_core.train import results, trainer

D, N_ATOMS, K, N_IMGS, N_TOKENS, VAL_FRAC = 32, 64, 2, 400, 17, 0.2


def _store(root, kind: str):
    rng = np.random.default_rng(0)
    n = N_IMGS * N_TOKENS
    atoms = rng.normal(size=(N_ATOMS, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    if kind == "atoms":  # each vector: 2 of 64 unit atoms with coefficients in [1, 2], plus a little noise
        which = np.stack([rng.choice(N_ATOMS, K, replace=False) for _ in range(n)])
        x = (rng.uniform(1, 2, size=(n, K, 1)) * atoms[which]).sum(1) + rng.normal(size=(n, D)) * 0.01
    else:
        x = rng.normal(size=(n, D))
    store = write_store(
        os.path.join(root, kind), x.reshape(1, N_IMGS, N_TOKENS, D).astype(np.float32), imgs_per_shard=40
    )
    return store, atoms


def _trained_report(root, kind):
    store, atoms = _store(root, kind)
    cfg = config.TrainConfig(
        data=config.DataLoadConfig(shard_root=store.path, layer=-2, val_frac=VAL_FRAC),
        sae=config.SparseAutoencoderConfig(d_vit=D, exp_factor=2, arch="topk", k=K),
        n_patches=100_000,
        sae_batch_size=256,
        ckpt_path=os.path.join(root, f"ckpt_{kind}"),
        device="cpu",
        log_every=100_000,
    )
    [member] = trainer.train_sweep([cfg], show_progress=False)
    table = pd.read_csv(results.sweep_csv_path(cfg.ckpt_path))
    sweep = controls.sweep_controls(table, store, -2, "patches", VAL_FRAC, cfg.seed, kmeans=True)
    facts = report.RunFacts(n_train_vectors=round(N_IMGS * (1 - VAL_FRAC)) * (N_TOKENS - 1))
    return report.layer_report(-2, sweep, None, facts), member, atoms


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("verdict"))
    return {kind: _trained_report(root, kind) for kind in ("atoms", "gaussian")}


def test_planted_atoms_are_recovered_and_the_verdict_says_structure_was_found(reports):
    rep, member, atoms = reports["atoms"]
    decoder = nn.load(member.ckpt_path).W_dec.detach().numpy()
    decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    recovered = np.abs(atoms @ decoder.T).max(axis=1)  # each planted atom's best decoder row
    assert np.mean(recovered > 0.9) > 0.8  # the ground truth: the SAE found the atoms
    text = "\n".join(rep.verdict)
    assert "**Structure found**" in text and "No structure" not in text
    assert "beats PCA at matched L0" in text and "beats the random-decoder control" in text
    assert rep.chosen["gain_vs_random"] > 0.5


def test_isotropic_noise_gets_no_credit_even_though_the_sae_beats_pca(reports):
    rep, _, _ = reports["gaussian"]
    text = "\n".join(rep.verdict)
    assert "**No structure found**" in text and "Structure found" not in text.replace("No structure found", "")
    assert "no sparse structure in these activations" in text
    # an adaptive sparse code beats PCA at matched L0 on pure noise: why the verdict rests on the random control
    assert rep.chosen["gain_vs_pca"] > 0
    assert rep.chosen["gain_vs_random"] < 0.1
