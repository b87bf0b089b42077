"""Latent-class association: a planted latent that fires only on one class ranks first for it with AUROC 1, and
every AUROC equals sklearn's."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from saev_core import config
from saev_core.visuals import association, association_cache, render
from tests.helpers import identity_sae, store_with_class_images

N_IMGS, N_PATCHES, D = 40, 4, 8
PLANTED, CLASS = 3, 1


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three classes; dimension PLANTED is positive on one patch of every image of class CLASS and nowhere else;
    the other dimensions are noise on every class. The images exist, so the visuals job runs end to end."""
    root = tmp_path_factory.mktemp("assoc")
    rng = np.random.default_rng(0)
    labels = np.arange(N_IMGS) % 3
    acts = rng.normal(0, 1, (1, N_IMGS, 1 + N_PATCHES, D)).astype(np.float32)
    acts[0, :, :, PLANTED] = -1.0
    for i in np.flatnonzero(labels == CLASS):
        acts[0, i, 1 + rng.integers(N_PATCHES), PLANTED] = rng.uniform(0.5, 2.0)
    store = store_with_class_images(root, acts, labels, ["bird", "cat", "dog"], rng, side=32)
    ckpt = identity_sae(root / "sae.pt", store.path, D)
    return root, store, ckpt, acts, labels


def test_planted_latent_ranks_first_for_its_class_with_auroc_one(planted, tmp_path):
    root, store, ckpt, acts, labels = planted
    cfg = config.VisualsConfig(
        ckpt=ckpt,
        dump_to=str(tmp_path / "v"),
        data=config.VisualsDataConfig(shard_root=store.path, layer=-1, patches="patches"),
        top_k=8,
        n_imgs_per_latent=2,
        log_freq_range=(-10.0, 0.0),
        log_value_range=(-10.0, 10.0),
        device="cpu",
    )
    render.make_visuals(cfg, show_progress=False)
    out = json.loads((tmp_path / "v" / "association.json").read_text())
    best = out["top_latents_per_class"]["cat"][0]
    assert best == {"latent": PLANTED, "auroc": 1.0}
    assert out["top_classes_per_latent"][str(PLANTED)][0] == {"class": "cat", "auroc": 1.0}

    assoc = association_cache.load(str(tmp_path / "v"))
    # The label distribution of its top images: only cats (it fires on no other image).
    assert assoc.top_label_counts[PLANTED].tolist() == [0, 8, 0]
    # Every AUROC against sklearn, from the image values recomputed plainly (best patch of relu(x)).
    values = np.maximum(acts[0, :, 1:], 0).max(axis=1)  # [imgs, latents]
    for c in range(3):
        for latent in range(D):
            expected = roc_auc_score(labels == c, values[:, latent])
            assert assoc.auroc[c, latent] == pytest.approx(expected, abs=1e-6)
    page = (tmp_path / "v" / "index.html").read_text()
    assert 'id="classes"' in page and 'data-sel="1.0"' in page


def test_auroc_counts_ties_as_one_half():
    values = np.array([[0.0], [0.0], [1.0], [0.0]])
    labels = np.array([0, 1, 1, 0])
    auroc = association.auroc_per_class(values, labels, 2)
    assert auroc[1, 0] == pytest.approx(roc_auc_score(labels == 1, values[:, 0]))  # 0.75
    assert auroc[0, 0] == pytest.approx(roc_auc_score(labels == 0, values[:, 0]))


def test_auroc_blocks_of_latents_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(1)
    values = np.where(rng.random((60, 7)) < 0.5, 0.0, rng.exponential(1.0, (60, 7)))
    labels = rng.integers(0, 3, 60)
    whole = association.auroc_per_class(values, labels, 3)
    monkeypatch.setattr(association, "RANK_COLUMNS", 2)
    np.testing.assert_allclose(association.auroc_per_class(values, labels, 3), whole)
    for c in range(3):
        np.testing.assert_allclose(whole[c], [roc_auc_score(labels == c, values[:, j]) for j in range(7)])
