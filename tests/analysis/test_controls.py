"""The random-decoder control against plain numpy, on the SAEs' own held-out vectors."""

import numpy as np
import pandas as pd
import pytest

from saev_core.analysis import controls, report
from saev_core.store import loader, write_store


def planted_store(tmp_path, d=12, n_imgs=60, n_tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    acts = (rng.normal(size=(1, n_imgs, n_tokens, d)) * np.linspace(3, 0.2, d) + 2.0).astype(np.float32)
    return write_store(str(tmp_path / "s"), acts, imgs_per_shard=16), acts


def test_held_out_is_the_saes_held_out_split(tmp_path):
    store, acts = planted_store(tmp_path)
    got = controls.held_out(store, -2, "patches", val_frac=0.25, seed=3)
    _, val = loader.split_images(store, 0.25, 3)
    want = acts[0, val, 1:].reshape(-1, acts.shape[-1])  # the patch tokens of the held-out images (CLS is token 0)
    assert got.x.shape == want.shape
    np.testing.assert_array_equal(np.sort(got.x, axis=0), np.sort(want, axis=0))  # same vectors, shuffled
    d_mean = acts[0, :, 1:].reshape(-1, acts.shape[-1]).astype(np.float64).mean(0)
    np.testing.assert_allclose(got.center, d_mean, rtol=1e-5)  # the store's statistics mean (all valid images)


@pytest.mark.parametrize("l0", [1, 3, 5.4])
def test_random_decoder_nmse_equals_a_plain_numpy_loop(tmp_path, l0):
    store, _ = planted_store(tmp_path)
    data = controls.held_out(store, -2, "patches", val_frac=0.25, seed=3)
    d_sae = 48
    got = controls.random_decoder_nmse(data, d_sae, l0, chunk=7)

    rng = np.random.default_rng([controls.CONTROL_SEED, d_sae, data.x.shape[1]])
    atoms = rng.normal(size=(d_sae, data.x.shape[1]))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    k = round(l0)
    x = data.x.astype(np.float64)
    err = 0.0
    for v in x:
        c = v - data.center
        support = np.argsort(-(atoms @ c), kind="stable")[:k]
        coef, *_ = np.linalg.lstsq(atoms[support].T, c, rcond=None)
        err += ((c - atoms[support].T @ coef) ** 2).sum()
    want = err / ((x - x.mean(0)) ** 2).sum()
    assert got == pytest.approx(want, rel=1e-6)
    assert 0 < got < 1  # some of the variance, not all


def test_random_decoder_with_as_many_atoms_as_dimensions_is_exact(tmp_path):
    """L0 = d_vit random atoms span the space: least squares reconstructs every vector."""
    store, _ = planted_store(tmp_path)
    data = controls.held_out(store, -2, "patches", val_frac=0.25, seed=3)
    assert controls.random_decoder_nmse(data, 48, data.x.shape[1]) == pytest.approx(0.0, abs=1e-9)


def test_report_shows_the_control_and_says_whether_the_sae_beats_it(tmp_path):
    store, _ = planted_store(tmp_path)
    data = controls.held_out(store, -2, "patches", val_frac=0.25, seed=3)
    rows = [
        {"member_id": "a", "sae.arch": "topk", "sae.d_vit": 12, "sae.exp_factor": 4, "sae.k": 2, "nmse": 0.01, "l0": 2},
        {"member_id": "b", "sae.arch": "topk", "sae.d_vit": 12, "sae.exp_factor": 4, "sae.k": 4, "nmse": 0.99, "l0": 4},
    ]
    csv = tmp_path / "sweep.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    rep = report.layer_report(-2, str(csv), None, None, held_out=data)
    want = [controls.random_decoder_nmse(data, 48, 2), controls.random_decoder_nmse(data, 48, 4)]
    assert list(rep.table["random_nmse_at_l0"]) == pytest.approx(want)
    summary = report.markdown_summary(rep)
    assert "random-decoder control" in summary and "the SAE is" in summary and "better" in summary
    assert "random_nmse_at_l0" in report.markdown_table(rep.table)
