"""Patch probes: the exact metrics against scikit-learn, the binned pass against the exact metrics of the same
(quantised) scores, the probe fit against scikit-learn's logistic regression, and the whole job on a planted store
whose labels are a known function of planted atoms."""

import json
import os

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from saev_core import config, nn
from saev_core.__main__ import main
from saev_core.analysis import probe_bins, probe_scores, probes
from saev_core.store import write_store
from saev_core.store.loader import split_images
from tests.helpers import exact_relu_sae

# ----------------------------------------------------------------------------------------------------------------
# Exact metrics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_equals_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 500))
    positive = rng.random(n) < rng.uniform(0.05, 0.7)
    positive[0] = True
    scores = rng.normal(size=n) + positive * rng.uniform(0, 2)
    assert probes.average_precision(scores, positive) == pytest.approx(average_precision_score(positive, scores))
    tied = np.round(scores, 1)  # many ties: each group of tied scores is one step
    assert probes.average_precision(tied, positive) == pytest.approx(average_precision_score(positive, tied))


def test_average_precision_without_positives_is_nan():
    assert np.isnan(probes.average_precision(np.arange(5.0), np.zeros(5, bool)))


def test_purity_at_k_counts_the_top_k_and_ties_pro_rata():
    rng = np.random.default_rng(0)
    scores, positive = rng.normal(size=300), rng.random(300) < 0.3
    top = np.argsort(-scores)[:25]
    assert probes.purity_at_k(scores, positive, 25) == pytest.approx(positive[top].mean())
    # 2 above the tie, 4 tied for the last 3 slots of k = 5, 2 of the 4 positive: (1 + 3 * 2/4) / 5
    s = np.array([5.0, 4.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    p = np.array([True, False, True, True, False, False, True])
    assert probes.purity_at_k(s, p, 5) == pytest.approx((1 + 3 * 0.5) / 5)


# ----------------------------------------------------------------------------------------------------------------
# The binned accumulator against exact metrics of the quantised scores
# ----------------------------------------------------------------------------------------------------------------


def _accumulate(f_cal, f_train, c_train, f_val, c_val, n_classes, k, n_bins=16):
    rows, cols = np.nonzero(f_cal)
    edges = probes.bin_edges(torch.from_numpy(cols), torch.from_numpy(f_cal[rows, cols]), f_cal.shape[1], n_bins=n_bins)
    acc = probe_bins.BinAccumulator(edges, n_classes, k)
    acc.add(torch.from_numpy(f_train), torch.from_numpy(c_train), "train")
    for half in (slice(0, len(f_val) // 2), slice(len(f_val) // 2, None)):  # two batches: the merge is exercised
        acc.add(torch.from_numpy(f_val[half]), torch.from_numpy(c_val[half]), "val")
    return acc.result()


def _sparse_values(rng, n, width):
    f = rng.gamma(2.0, size=(n, width)).astype(np.float32)
    f[rng.random((n, width)) < 0.7] = 0  # an SAE's zeros: one big tie
    f[:, 0] = rng.normal(size=n)  # a signed "latent" (PCA-like)
    return f


def test_binned_ap_and_counts_are_those_of_the_quantised_scores():
    rng = np.random.default_rng(1)
    n_classes, width = 3, 5
    f_cal, f_train, f_val = (_sparse_values(rng, n, width) for n in (400, 300, 500))
    c_train, c_val = rng.integers(0, n_classes, 300), rng.integers(0, n_classes, 500)
    data = _accumulate(f_cal, f_train, c_train, f_val, c_val, n_classes, k=20)
    edges = data.edges.numpy()
    for j in range(width):
        bins = np.searchsorted(edges[j], f_val[:, j], side="left")  # numpy's own binning of the values
        for c in range(n_classes):
            counts = np.bincount(bins[c_val == c], minlength=edges.shape[1] + 1)
            np.testing.assert_array_equal(data.val_count[j, :, c].numpy(), counts)
            pos, total = data.val_count[j, :, c].numpy()[::-1], data.val_count[j].sum(1).numpy()[::-1]
            binned_ap = float(probe_scores._ap_from_groups(pos, total))
            assert binned_ap == pytest.approx(average_precision_score(c_val == c, bins))
        train_bins = np.searchsorted(edges[j], f_train[:, j], side="left")
        sums = np.bincount(train_bins, weights=f_train[:, j], minlength=edges.shape[1] + 1)
        np.testing.assert_allclose(data.train_sum[j].sum(1).numpy(), sums, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [5, 40, 450])
def test_kept_extremes_give_the_exact_purity_zeros_pro_rata(k):
    rng = np.random.default_rng(2)
    n_classes, width = 3, 5
    f_cal, f_train, f_val = (_sparse_values(rng, n, width) for n in (400, 300, 500))
    c_train, c_val = rng.integers(0, n_classes, 300), rng.integers(0, n_classes, 500)
    data = _accumulate(f_cal, f_train, c_train, f_val, c_val, n_classes, k=k)
    top_v, top_c = data.top_values.numpy(), data.top_classes.numpy()
    zero_bins = (data.edges.numpy() < 0).sum(1)
    for j in range(width):
        for c in range(n_classes):
            for sign in (1.0, -1.0):
                got = probe_scores._purity(top_v, top_c, data.val_count[j].numpy(), int(zero_bins[j]), j, c, k, sign, k)
                want = probes.purity_at_k(sign * f_val[:, j], c_val == c, k)
                assert got == pytest.approx(want), (j, c, sign)


def test_probe_fit_matches_sklearn_when_bins_hold_one_value():
    """Values from a few distinct numbers: each bin holds one value, so the binned fit is the exact fit."""
    rng = np.random.default_rng(3)
    n_classes, n = 2, 4000
    classes = rng.integers(0, n_classes, n)
    levels = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0], dtype=np.float32)
    # class 0 leans to high values, class 1 to low ones: not separable, so the unpenalised fit is finite
    idx = np.clip(rng.integers(0, 5, n) + 2 * (classes == 0), 0, len(levels) - 1)
    f = levels[idx][:, None].repeat(2, axis=1)
    f[:, 1] = levels[rng.integers(0, len(levels), n)]  # an unrelated latent
    data = _accumulate(f, f, classes, f[:10], classes[:10], n_classes, k=3, n_bins=32)
    fit = probes.fit_probes(data)
    for j in range(2):
        for c in range(n_classes):
            ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(f[:, j : j + 1], classes == c)
            p = ref.predict_proba(f[:, j : j + 1])[:, 1]
            y = classes == c
            ref_loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
            assert fit.weight[j, c] == pytest.approx(ref.coef_[0, 0], rel=1e-2, abs=1e-3)
            assert fit.bias[j, c] == pytest.approx(ref.intercept_[0], rel=1e-2, abs=1e-3)
            assert fit.loss[j, c] == pytest.approx(ref_loss, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The job on a planted store
# ----------------------------------------------------------------------------------------------------------------

N_IMGS, N_PATCHES, D_VIT, N_CLASSES = 60, 16, 48, 3


def planted_store(root, with_labels: bool = True):
    """Patches of class c have atom c - 1 at 2..3; every other coordinate (and unlabelled patches) uniform in
    [-1, 1]: the relu SAE's latent c - 1 separates class c, a random direction does not."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, N_CLASSES + 1, size=(N_IMGS, N_PATCHES))
    acts = rng.uniform(-1, 1, size=(1, N_IMGS, N_PATCHES + 1, D_VIT)).astype(np.float32)
    for c in range(1, N_CLASSES + 1):
        acts[0, :, 1:, c - 1][labels == c] = rng.uniform(2, 3, size=(labels == c).sum())
    names = ["unlabelled", "cat", "dog", "sky"]
    store = write_store(
        str(root),
        acts,
        imgs_per_shard=16,
        patch_labels=labels if with_labels else None,
        patch_class_names=names if with_labels else None,
    )
    return store, acts[0, :, 1:], labels


def planted_ckpt(root, store) -> str:
    return nn.dump(
        os.path.join(root, "sae"),
        exact_relu_sae(D_VIT),
        {"store": store.path, "layer": -2, "token_mode": "patches", "data_seed": 7},
    )


def test_probe_cli_on_a_planted_store(tmp_path, capsys):
    store, x, labels = planted_store(tmp_path / "acts")
    ckpt = planted_ckpt(tmp_path, store)
    out = tmp_path / "probes"
    argv = ["probe", "--ckpt", ckpt, "--data.shard-root", store.path, "--data.layer", "-2", "--data.val-frac", "0.3"]
    assert main([*argv, "--dump-to", str(out), "--k", "20", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "probe.json")
    doc = json.loads((out / "probe.json").read_text())
    for key in ("map", "coverage", "purity_at_k", "k", "tau", "classes", "controls"):
        assert key in doc
    assert doc["k"] == 20 and doc["tau"] == 0.3 and set(doc["controls"]) == {"pca", "random", "kmeans"}

    # the independent reference: the split, each class's planted latent on the held-out labelled patches
    train, val = split_images(store, 0.3, 7)
    val_x, val_y = x[val][labels[val] > 0], labels[val][labels[val] > 0]
    for c, row in enumerate(doc["classes"], start=1):
        assert row["class"] == ["cat", "dog", "sky"][c - 1]
        assert row["best_latent"] == c - 1  # the planted atom's positive part
        assert row["n_train"] == (labels[train] == c).sum() and row["n_val"] == (val_y == c).sum()
        exact_ap = average_precision_score(val_y == c, np.maximum(val_x[:, c - 1], 0))
        assert exact_ap == pytest.approx(1.0)
        assert row["ap"] >= 0.98 and row["ap"] == pytest.approx(exact_ap, abs=0.02)
        assert row["purity_at_k"] == 1.0
    assert doc["map"] >= 0.98 and doc["coverage"] == 1.0 and doc["purity_at_k"] == 1.0

    random = doc["controls"]["random"]
    assert random["width"] == 2 * D_VIT and random["map"] < 0.8 and random["purity_at_k"] < 1.0
    for row in random["classes"]:  # the control's own AP, re-computed exactly from its best latent
        assert row["ap"] < 0.9


def test_probe_without_patch_labels_says_how_to_get_them(tmp_path, capsys):
    store, _, _ = planted_store(tmp_path / "acts", with_labels=False)
    ckpt = planted_ckpt(tmp_path, store)
    assert main(["probe", "--ckpt", ckpt, "--dump-to", str(tmp_path / "p"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no per-patch labels" in err[0] and "data:seg-folder-dataset" in err[0]
    assert not (tmp_path / "p" / "probe.json").exists()


def test_probe_refuses_an_sae_of_cls_vectors(tmp_path):
    store, _, _ = planted_store(tmp_path / "acts")
    ckpt = nn.dump(
        os.path.join(tmp_path, "sae"), exact_relu_sae(D_VIT), {"store": store.path, "layer": -2, "token_mode": "cls"}
    )
    from saev_core.analysis import probe_run
    from saev_core.errors import UserError

    with pytest.raises(UserError, match="trained on patches"):
        probe_run.run_probes(config.ProbeConfig(ckpt=ckpt, dump_to=str(tmp_path / "p"), device="cpu"))


def test_the_split_is_the_sae_members_own(tmp_path):
    """val_frac from the member's row of the sweep.csv beside its folder, the seed from its provenance; flags win."""
    from saev_core.analysis import probe_run

    ckpt = tmp_path / "layer_-2" / "m1" / "sae.pt"
    ckpt.parent.mkdir(parents=True)
    (tmp_path / "layer_-2" / "sweep.csv").write_text(
        f"member_id,ckpt,data.val_frac,seed\nm0,{tmp_path}/layer_-2/m0/sae.pt,0.5,1\nm1,{ckpt},0.3,5\n"
    )
    data = config.ProbeDataConfig()
    assert probe_run._split_settings(str(ckpt), {"data_seed": 9}, data) == (0.3, 9)
    assert probe_run._split_settings(str(ckpt), {}, data) == (0.3, 5)
    flags = config.ProbeDataConfig(val_frac=0.2, seed=3)
    assert probe_run._split_settings(str(ckpt), {"data_seed": 9}, flags) == (0.2, 3)
    assert probe_run._split_settings(str(tmp_path / "elsewhere.pt"), {}, data) == (0.1, 42)  # the training defaults


def test_a_class_missing_from_a_split_is_listed_but_left_out_of_every_mean():
    rng = np.random.default_rng(4)
    f = _sparse_values(rng, 600, 4)
    c_train = rng.integers(0, 3, 300)
    c_val = rng.integers(0, 2, 300)  # class 2 has no held-out patch
    c_train[c_train == 1] = 0  # class 1 has no training patch
    data = _accumulate(f[:200], f[:300], c_train, f[300:], c_val, 3, k=10)
    m = probes.evaluate("sae", data, probes.fit_probes(data), ["a", "b", "c"], k=10, tau=0.3)
    a, b, c = m.classes
    assert b.best_latent is None and b.ap is None and b.n_train == 0 and b.n_val == (c_val == 1).sum()
    assert c.best_latent is not None and c.ap is None and c.n_val == 0
    assert a.ap is not None and m.map == pytest.approx(a.ap) and m.as_dict()["n_classes_evaluated"] == 1
    assert m.coverage == float(a.ap >= 0.3) and m.purity_at_k == pytest.approx(a.purity_at_k)
