"""The random-decoder control against plain numpy, on the SAEs' own held-out vectors."""

import numpy as np
import pandas as pd
import pytest

from saev_core.analysis import controls
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


def clustered_store(tmp_path, n_centres=6, d=12, n_imgs=120, n_tokens=5, noise=0.01, seed=0):
    """Every vector is one of ``n_centres`` planted centres plus a little noise: k-means with that many centroids
    must find them (known answer: NMSE = the noise's share of the variance)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, d)) * 3
    which = rng.integers(n_centres, size=(n_imgs, n_tokens))
    acts = (centres[which] + rng.normal(size=(n_imgs, n_tokens, d)) * noise)[None].astype(np.float32)
    return write_store(str(tmp_path / "c"), acts, imgs_per_shard=16), centres


def test_kmeans_finds_planted_centres(tmp_path):
    store, centres = clustered_store(tmp_path)
    data = controls.held_out(store, -2, "patches", val_frac=0.25, seed=3)
    train_x = controls.training_sample(store, -2, "patches", val_frac=0.25, seed=3)
    got = controls.kmeans_nmse(train_x, data, n_centroids=len(centres))
    x = data.x.astype(np.float64)
    nearest = centres[np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), axis=1)]  # the planted answer
    want = ((x - nearest) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert got == pytest.approx(want, rel=0.05)
    assert got < 1e-3  # the noise's share only


def test_kmeans_with_one_centroid_reconstructs_by_the_training_mean(tmp_path):
    store, _ = planted_store(tmp_path)
    data = controls.held_out(store, -2, "patches", val_frac=0.25, seed=3)
    train_x = controls.training_sample(store, -2, "patches", val_frac=0.25, seed=3)
    x = data.x.astype(np.float64)
    want = ((x - train_x.astype(np.float64).mean(0)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert controls.kmeans_nmse(train_x, data, n_centroids=1) == pytest.approx(want, rel=1e-5)


def test_training_sample_is_the_saes_training_split(tmp_path):
    store, acts = planted_store(tmp_path)
    got = controls.training_sample(store, -2, "patches", val_frac=0.25, seed=3)
    train, _ = loader.split_images(store, 0.25, 3)
    want = acts[0, train, 1:].reshape(-1, acts.shape[-1])
    np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(want, axis=0))


def _members(d_vit=12):
    return pd.DataFrame(
        [
            {"member_id": "a", "sae.d_vit": d_vit, "sae.exp_factor": 4, "nmse": 0.05, "l0": 2.0},
            {"member_id": "b", "sae.d_vit": d_vit, "sae.exp_factor": 2, "nmse": 0.99, "l0": 4.2},
            {"member_id": "c", "sae.d_vit": d_vit, "sae.exp_factor": 2, "nmse": float("nan"), "l0": float("nan")},
        ]
    )


def test_sweep_controls_put_every_control_and_its_gain_beside_each_member(tmp_path):
    store, _ = planted_store(tmp_path)
    split = (store, -2, "patches", 0.25, 3)
    got = controls.sweep_controls(_members(), *split, kmeans=True)
    data = controls.held_out(*split)
    train_x = controls.training_sample(*split)
    pca = controls.pca_baseline(*split)
    t = got.table
    assert list(t["pca_nmse_at_l0"][:2]) == pytest.approx([pca.at(2), pca.at(4)])
    want_random = [controls.random_decoder_nmse(data, 48, 2.0), controls.random_decoder_nmse(data, 24, 4.2)]
    assert list(t["random_nmse_at_l0"][:2]) == pytest.approx(want_random)
    want_kmeans = [controls.kmeans_nmse(train_x, data, 48), controls.kmeans_nmse(train_x, data, 24)]
    assert list(t["kmeans_nmse"][:2]) == pytest.approx(want_kmeans)
    for control, gain in controls.GAINS.items():
        want = [(c - n) / c for n, c in zip([0.05, 0.99], t[control][:2])]
        assert list(t[gain][:2]) == pytest.approx(want)
        assert np.isnan(t[gain][2])  # a NaN member has no gain
    assert t["gain_vs_pca"][0] > 0 > t["gain_vs_pca"][1]  # the first beats PCA, the second loses
    assert got.notes == []


def test_kmeans_is_left_out_with_a_note_when_it_would_be_slow(tmp_path, monkeypatch):
    store, _ = planted_store(tmp_path)
    monkeypatch.setattr(controls, "KMEANS_BUDGET", 0)
    got = controls.sweep_controls(_members(), store, -2, "patches", 0.25, 3)
    assert "kmeans_nmse" not in got.table and "random_nmse_at_l0" in got.table
    [note] = got.notes
    assert note.startswith("k-means left out: fitting 48 centroids") and "[report] kmeans = true" in note
    assert "kmeans_nmse" in controls.sweep_controls(_members(), store, -2, "patches", 0.25, 3, kmeans=True).table
