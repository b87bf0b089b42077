"""The PCA control against a plain numpy PCA."""

import numpy as np
import pytest

from saev_core.analysis import controls
from saev_core.store import loader, write_store


@pytest.mark.parametrize("patches", ["patches", "cls"])
def test_pca_baseline_equals_a_plain_numpy_pca(tmp_path, patches):
    rng = np.random.default_rng(0)
    d, n_imgs, n_tokens = 12, 60, 5
    basis = rng.normal(size=(d, d)) * np.linspace(3, 0.1, d)[:, None]  # anisotropic: PCA has something to find
    acts = (rng.normal(size=(1, n_imgs, n_tokens, d)) @ basis + 5.0).astype(np.float32)
    store = write_store(str(tmp_path / "s"), acts, imgs_per_shard=16)
    got = controls.pca_baseline(store, -2, patches, val_frac=0.25, seed=3)

    train, val = loader.split_images(store, 0.25, 3)
    pick = (lambda x: x[:, 1:].reshape(-1, d)) if patches == "patches" else (lambda x: x[:, 0])
    xt, xv = pick(acts[0, train]).astype(np.float64), pick(acts[0, val]).astype(np.float64)
    mean = xt.mean(0)
    _, _, vt = np.linalg.svd(xt - mean, full_matrices=False)
    for k in (1, 3, d - 1, d):
        p = vt[:k].T
        recon = mean + (xv - mean) @ p @ p.T
        want = ((xv - recon) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()
        assert got.at(k) == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert got.at(d) == pytest.approx(0.0, abs=1e-9)  # every component: exact
    assert got.at(0.4) == got.at(1)  # L0 rounds, at least one component
