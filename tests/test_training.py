"""The sweep trainer, on activation stores planted here with ActivationStore.create/write_block.

References are independent of the trainer: SAEs trained alone, a schedule formula written out here, metrics
recomputed from the store with plain zarr reads, a planted dictionary, and a run killed with SIGKILL.
"""

import dataclasses
import glob
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch

from saev_core import config, nn, training
from saev_core.errors import UserError
from saev_core.loader import ActivationLoader, split_images
from saev_core.stats import normalization
from saev_core.store import ActivationStore, write_store

D = 16
DEVICE = os.environ.get("SAEV_TEST_DEVICE", "cpu")
"""SAEV_TEST_DEVICE=cuda runs these tests on a GPU (equalities hold there too: each member repeats the same kernels)."""


def plant(root, acts: np.ndarray, imgs_per_shard: int = 50, key: str = "x") -> ActivationStore:
    """A complete one-layer store (layer -2, no CLS token) holding acts [n_imgs, n_tokens, d]."""
    return write_store(str(root), acts[None].astype(np.float32), cls_token=False, imgs_per_shard=imgs_per_shard,
                       resolved_layers=(10,), fingerprint=key)


def gaussian_acts(n_imgs=200, n_tokens=16, d=D, offset=3.0, scale=2.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_imgs, n_tokens, d)) * scale + offset).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    return plant(tmp_path_factory.mktemp("store"), gaussian_acts())


def train_cfg(store: ActivationStore, ckpt, **kw) -> config.TrainConfig:
    sae = config.SparseAutoencoderConfig(**{"d_vit": D, "exp_factor": 4, "arch": "topk", "k": 4, "k_aux": 8,
                                      "dead_after_n_patches": 2000, **kw.pop("sae", {})})
    base = dict(data=config.DataLoadConfig(shard_root=store.path, layer=-2), sae=sae, n_patches=40 * 128,
                sae_batch_size=128, lr=1e-3, n_lr_warmup=5, ckpt_path=str(ckpt), ckpt_every=10, log_every=5,
                device=DEVICE)
    return config.TrainConfig(**{**base, **kw})


def with_sae(cfg: config.TrainConfig, **kw) -> config.TrainConfig:
    return dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, **kw))


def state(path) -> dict[str, torch.Tensor]:
    return nn.load(path).state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# One pass == separate runs; seeds
# ---------------------------------------------------------------------------------------------------------------


def test_one_pass_of_three_different_saes_equals_each_trained_alone(store, tmp_path):
    base = train_cfg(store, tmp_path / "together")
    cfgs = [
        with_sae(base, arch="topk", exp_factor=4, seed=1),
        dataclasses.replace(with_sae(base, arch="relu", exp_factor=2, sparsity_coeff=1e-3, seed=2), lr=3e-4,
                            n_sparsity_warmup=10),
        dataclasses.replace(with_sae(base, arch="batchtopk", exp_factor=8, k=3, seed=3), lr=2e-3,
                            max_grad_norm=0.5),
    ]
    together = training.train_sweep(cfgs, show_progress=False)
    assert len({os.path.dirname(r.ckpt_path) for r in together}) == 3
    for i, cfg in enumerate(cfgs):
        [alone] = training.train_sweep([dataclasses.replace(cfg, ckpt_path=str(tmp_path / f"alone{i}"))],
                                       show_progress=False)
        assert alone.member_id == together[i].member_id
        diff = max_diff(state(together[i].ckpt_path), state(alone.ckpt_path))
        assert diff <= 1e-6, f"member {i} ({cfg.sae.arch}) differs by {diff}"
        assert together[i].metrics["nmse"] == pytest.approx(alone.metrics["nmse"], rel=1e-5)


def test_same_seed_gives_equal_tensors_and_another_sae_seed_differs(store, tmp_path):
    cfg = train_cfg(store, tmp_path / "a", n_patches=15 * 128, sae={"seed": 11})
    [a] = training.train_sweep([cfg], show_progress=False)
    [b] = training.train_sweep([dataclasses.replace(cfg, ckpt_path=str(tmp_path / "b"))], show_progress=False)
    [c] = training.train_sweep([with_sae(cfg, seed=12)], show_progress=False)
    sa, sb, sc = state(a.ckpt_path), state(b.ckpt_path), state(c.ckpt_path)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["W_enc"], sc["W_enc"]) and not torch.equal(sa["W_dec"], sc["W_dec"])


# ---------------------------------------------------------------------------------------------------------------
# Schedules, normalisation, outputs
# ---------------------------------------------------------------------------------------------------------------


def test_lr_warmup_then_decay_and_sparsity_warmup_reach_optimizer_and_loss(store, tmp_path):
    n_steps, n_warm, n_sparse, peak, coeff = 40, 10, 20, 2e-3, 1e-2
    cfg = train_cfg(store, tmp_path, n_patches=n_steps * 128, lr=peak, n_lr_warmup=n_warm,
                    n_sparsity_warmup=n_sparse, log_every=1, sae={"arch": "relu", "sparsity_coeff": coeff})
    seen = []
    [r] = training.train_sweep([cfg], show_progress=False, on_log=lambda step, mid, rec: seen.append((step, rec)))
    logs = read_jsonl(os.path.join(os.path.dirname(r.ckpt_path), "metrics.jsonl"))
    assert [rec["step"] for rec in logs] == list(range(n_steps)) == [s for s, _ in seen]
    assert [rec for _, rec in seen] == logs

    def expected_lr(s):  # written out: ramp to the peak, then a straight line to 0 one step after the end
        return peak * (s + 1) / n_warm if s < n_warm else peak * (n_steps - s) / (n_steps - n_warm)

    for s in [0, 4, 9, 10, 25, n_steps - 1]:
        assert logs[s]["lr"] == pytest.approx(expected_lr(s), rel=1e-9), s
    assert logs[0]["lr"] == pytest.approx(peak / n_warm) and logs[-1]["lr"] == pytest.approx(peak / 30)
    assert max(rec["lr"] for rec in logs) == pytest.approx(peak)
    # relu: sparsity = coeff * scale * mean L1, and the logged l1 is that mean L1 of the same batch.
    assert logs[0]["sparsity"] == 0.0
    for s in [1, 5, 10, 19, 20, 30]:
        got = logs[s]["sparsity"] / (coeff * logs[s]["l1"])
        assert got == pytest.approx(min(1.0, s / n_sparse), rel=1e-4), s
    assert logs[15]["sparsity"] > logs[5]["sparsity"] > 0


def test_normalisation_is_saved_and_a_fresh_load_reproduces_the_training_metrics(tmp_path):
    acts = gaussian_acts(offset=40.0, scale=0.05, seed=1)  # far from the identity normalisation
    store = plant(tmp_path / "store", acts, key="norm")
    cfg = train_cfg(store, tmp_path / "ckpt", n_patches=30 * 128, data=config.DataLoadConfig(
        shard_root=store.path, layer=-2, scale_mean=True, scale_norm=True, val_frac=0.25))
    [r] = training.train_sweep([cfg], show_progress=False)
    sae = nn.load(r.ckpt_path)
    flat = acts.reshape(-1, D).astype(np.float64)
    mean = flat.mean(axis=0)
    np.testing.assert_allclose(sae.mean.numpy(), mean, rtol=1e-6)
    assert sae.scale.item() == pytest.approx(math.sqrt(D / ((flat - mean) ** 2).sum(axis=1).mean()), rel=1e-5)

    _, val = split_images(store, 0.25, cfg.seed)
    x = torch.from_numpy(acts[val].reshape(-1, D))

    def nmse_l0(model):
        with torch.no_grad():
            f_x = model.encode(x)
            x_hat = model.decode(f_x)
        x64, err = x.double(), (x.double() - x_hat.double())
        return (err**2).sum().item() / ((x64 - x64.mean(0)) ** 2).sum().item(), (f_x != 0).sum(1).double().mean().item()

    nmse, l0 = nmse_l0(sae)
    assert nmse == pytest.approx(r.metrics["nmse"], rel=1e-4) and l0 == pytest.approx(r.metrics["l0"])
    assert r.metrics["nmse"] < 0.9
    sae.set_normalization(torch.zeros(D), 1.0)  # the checkpoint without its statistics is a different model
    assert nmse_l0(sae)[0] > 2 * nmse


def test_outputs_sweep_csv_provenance_and_finished_members_are_not_retrained(store, tmp_path):
    base = train_cfg(store, tmp_path, n_patches=12 * 128)
    cfgs = [base, dataclasses.replace(with_sae(base, arch="jumprelu", seed=1), lr=5e-4)]
    results = training.train_sweep(cfgs, show_progress=False)
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert len(table) == 2 and list(table["member_id"]) == [r.member_id for r in results]
    for col in ["member_id", "sae.arch", "sae.exp_factor", "lr", "data.layer", "nmse", "ev", "mse", "l0", "l1",
                "frac_dead", "frac_dense", "ckpt"]:
        assert col in table.columns, col
    assert list(table["sae.arch"]) == ["topk", "jumprelu"] and list(table["lr"]) == [1e-3, 5e-4]
    assert list(table["ckpt"]) == [r.ckpt_path for r in results]
    folder = os.path.dirname(results[0].ckpt_path)
    assert sorted(os.listdir(folder)) == ["config.json", "latent_stats.npz", "metrics.json", "metrics.jsonl", "sae.pt"]
    assert not glob.glob(str(tmp_path / "group-*.json"))
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f) == json.loads(json.dumps(dataclasses.asdict(results[0].cfg)))
    acts = gaussian_acts()  # what the store fixture holds
    for r in results:
        with open(os.path.join(os.path.dirname(r.ckpt_path), "metrics.json")) as f:
            saved = json.load(f)
        assert {"nmse", "ev", "mse", "l0", "l1", "frac_dead", "frac_dense"} <= saved.keys()
        # Recomputed here: the checkpoint through the held-out images read with numpy, reduced in float64 numpy.
        _, val = split_images(store, r.cfg.data.val_frac, r.cfg.seed)
        assert 0 < len(val) < len(acts)
        x = acts[val].reshape(-1, D)
        sae = nn.load(r.ckpt_path)
        with torch.no_grad():
            f_x = sae.encode(torch.from_numpy(x))
            x_hat = sae.decode(f_x).double().numpy()
        x64 = x.astype(np.float64)
        nmse = ((x64 - x_hat) ** 2).sum() / ((x64 - x64.mean(axis=0)) ** 2).sum()
        l0 = (f_x.numpy() != 0).sum(axis=1).mean()
        assert saved["nmse"] == pytest.approx(nmse, rel=1e-5) and saved["l0"] == pytest.approx(l0, rel=1e-5)
        assert np.isfinite(saved["nmse"]) and saved["nmse"] > 0  # 12 steps: not yet below 1 for every arch
    prov = nn.load(results[0].ckpt_path).provenance
    assert prov["store"] == store.path and prov["layer"] == -2 and prov["token_mode"] == "patches"
    assert prov["member_id"] == results[0].member_id and prov["steps"] == 12 and prov["vit_family"] == "clip"
    assert results[0].metrics["l0"] == pytest.approx(4.0) and 0 <= results[0].metrics["frac_dead"] <= 1

    mtimes = [os.stat(r.ckpt_path).st_mtime_ns for r in results]
    again = training.train_sweep(cfgs, show_progress=False, on_log=lambda *a: pytest.fail("retrained"))
    assert [os.stat(r.ckpt_path).st_mtime_ns for r in again] == mtimes
    assert [r.metrics["nmse"] for r in again] == [r.metrics["nmse"] for r in results]


# ---------------------------------------------------------------------------------------------------------------
# The planted dictionary
# ---------------------------------------------------------------------------------------------------------------


def test_topk_sae_recovers_a_planted_dictionary_through_the_cli(tmp_path, capsys):
    from saev_core.__main__ import main

    d, n_atoms, k, sigma, n_imgs, n_tokens = 64, 128, 4, 0.05, 1600, 64  # 102,400 vectors
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n = n_imgs * n_tokens
    which = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :k]  # k distinct atoms per vector
    coef = rng.uniform(0.5, 1.5, size=(n, k))
    x = np.einsum("nk,nkd->nd", coef, atoms[which]) + sigma * rng.normal(size=(n, d))
    store = plant(tmp_path / "store", x.reshape(n_imgs, n_tokens, d), imgs_per_shard=n_imgs, key="dict")

    rc = main(["train", "--data.shard-root", store.path, "--data.layer", "-2", "--sae.d-vit", str(d),
               "--sae.arch", "topk", "--sae.k", str(k), "--sae.exp-factor", str(2 * n_atoms // d),
               "--sae.dead-after-n-patches", "20000", "--lr", "3e-3", "--n-lr-warmup", "50",
               "--n-patches", str(600 * 256), "--sae-batch-size", "256", "--ckpt-path", str(tmp_path / "ckpt"),
               "--device", DEVICE, "--log-every", "200"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[-1] == str(tmp_path / "ckpt" / "sweep.csv")
    [ckpt] = glob.glob(str(tmp_path / "ckpt" / "*" / "sae.pt"))
    w = nn.load(ckpt).W_dec.detach().double().numpy()
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    best = (atoms @ w.T).max(axis=1)
    assert best.mean() >= 0.9, f"mean max cosine {best.mean():.3f}"


# ---------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL
# ---------------------------------------------------------------------------------------------------------------

def resume_cfgs(store, ckpt) -> list[config.TrainConfig]:
    base = train_cfg(store, ckpt, n_patches=100 * 128, ckpt_every=10, log_every=1)
    return [with_sae(base, seed=1), dataclasses.replace(with_sae(base, arch="batchtopk", exp_factor=2, seed=2),
                                                        lr=3e-3)]


def test_sweep_killed_mid_way_resumes_to_the_uninterrupted_weights(store, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    child = textwrap.dedent(f"""
        import time, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from saev_core import training
        from saev_core.store import ActivationStore
        from test_training import resume_cfgs
        store = ActivationStore.open({store.path!r})
        # Sleeping in the log callback slows the child down without touching the arithmetic.
        training.train_sweep(resume_cfgs(store, {str(killed)!r}), show_progress=False,
                             on_log=lambda *a: time.sleep(0.02))
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=os.path.dirname(os.path.dirname(__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not glob.glob(str(killed / "group-*.json")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [pointer] = glob.glob(str(killed / "group-*.json"))
    with open(pointer) as f:
        kept = json.load(f)["step"]
    assert 10 <= kept < 100 and not glob.glob(str(killed / "*" / "sae.pt"))

    steps_run = []
    resumed = training.train_sweep(resume_cfgs(store, killed), show_progress=False,
                                   on_log=lambda step, mid, rec: steps_run.append(step))
    assert min(steps_run) == kept  # it continued, it did not start over
    uninterrupted = training.train_sweep(resume_cfgs(store, clean), show_progress=False)
    for a, b in zip(resumed, uninterrupted):
        diff = max_diff(state(a.ckpt_path), state(b.ckpt_path))
        assert diff <= 1e-6, f"{a.cfg.sae.arch}: resumed weights differ by {diff}"
        logs = read_jsonl(os.path.join(os.path.dirname(a.ckpt_path), "metrics.jsonl"))
        clean_logs = read_jsonl(os.path.join(os.path.dirname(b.ckpt_path), "metrics.jsonl"))
        assert [r["step"] for r in logs] == list(range(100))  # no repeated or missing log lines
        assert [r["loss"] for r in logs] == pytest.approx([r["loss"] for r in clean_logs], rel=1e-5)
    assert not glob.glob(str(killed / "group-*.json")) and not glob.glob(str(killed / "*" / "train_state-*.pt"))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_sweep_file_with_unknown_key_or_wrong_type_names_key_and_file(store, tmp_path):
    base = train_cfg(store, tmp_path)
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[sae]\nexp_factr = [2, 4]\n")
    with pytest.raises(UserError, match=r"Unknown key 'sae.exp_factr' in .*bad_key.toml.*exp_factor"):
        training.train_main(dataclasses.replace(base, sweep=str(bad_key)))
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('lr = [1e-3, "fast"]\n')
    with pytest.raises(UserError, match=r"lr = 'fast' in .*bad_type.toml: expected float"):
        training.train_main(dataclasses.replace(base, sweep=str(bad_type)))
    assert not os.path.exists(tmp_path / "sweep.csv")


def test_sweep_file_trains_every_member_in_one_group(store, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('lr = [1e-3, 3e-4]\n[sae]\narch = ["topk", "relu"]\n')
    results = training.train_main(dataclasses.replace(train_cfg(store, tmp_path, n_patches=6 * 128),
                                                      sweep=str(sweep)))
    assert [(r.cfg.lr, r.cfg.sae.arch, r.cfg.sae.seed) for r in results] == [
        (1e-3, "topk", 0), (1e-3, "relu", 1), (3e-4, "topk", 2), (3e-4, "relu", 3)]
    assert len(pd.read_csv(tmp_path / "sweep.csv")) == 4


def test_sae_d_vit_that_differs_from_the_store_is_refused(store, tmp_path, capsys):
    from saev_core.__main__ import main

    with pytest.raises(UserError) as err:
        training.train_sweep([train_cfg(store, tmp_path, sae={"d_vit": 512})], show_progress=False)
    assert str(err.value).rstrip(".") == (f"--sae.d-vit 512 does not match the store's d_vit {D} ({store.path}); "
                              f"pass --sae.d-vit {D}")
    rc = main(["train", "--data.shard-root", store.path, "--sae.d-vit", "512", "--ckpt-path", str(tmp_path)])
    assert rc == 2 and "--sae.d-vit 512 does not match" in capsys.readouterr().err


def test_layer_not_in_the_store_is_the_stores_error(store, tmp_path):
    cfg = train_cfg(store, tmp_path, data=config.DataLoadConfig(shard_root=store.path, layer=5))
    with pytest.raises(UserError, match=r"Layer 5 is not in the store .*\[-2\]"):
        training.train_sweep([cfg], show_progress=False)
    assert not os.listdir(tmp_path)


def test_nan_in_the_data_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    n_imgs, n_tokens = 120, 8
    acts = gaussian_acts(n_imgs=n_imgs, n_tokens=n_tokens, seed=2)
    acts[:, :, 0] = np.arange(n_imgs)[:, None]  # coordinate 0 names the image, to find where it is read
    store = plant(tmp_path / "store", acts, imgs_per_shard=10, key="nan")
    data = config.DataLoadConfig(shard_root=store.path, layer=-2, buffer_chunks=1)
    cfg = train_cfg(store, tmp_path / "ckpt", data=data, sae_batch_size=32, n_patches=60 * 32, ckpt_every=2,
                    sae={"arch": "relu"})
    normalization(store, data)  # cache clean statistics in the store, as a first training run would

    first_seen: dict[int, int] = {}
    batches = list(ActivationLoader(store, data, 32, cfg.seed))
    for b, x in enumerate(batches[:-1]):  # full batches of epoch 0 (the short last one is skipped)
        for img in np.unique(x[:, 0].numpy().astype(int)):
            first_seen.setdefault(int(img), b)
    bad_img = max(first_seen, key=first_seen.get)
    bad_step = first_seen[bad_img]
    assert bad_step >= 4
    poisoned = acts[bad_img].copy()
    poisoned[3, 5] = np.nan
    store.array(-2)[bad_img] = poisoned

    kept = bad_step // 2 * 2
    with pytest.raises(UserError) as err:
        training.train_sweep([cfg], show_progress=False)
    msg = str(err.value)
    assert f"activations of step {bad_step} contain NaN" in msg and training.member_id(cfg) in msg
    assert "last good checkpoint is kept" in msg and f"(step {kept};" in msg
    [pointer] = glob.glob(str(tmp_path / "ckpt" / "group-*.json"))
    assert pointer in msg and json.load(open(pointer))["step"] == kept
    folder = tmp_path / "ckpt" / training.member_id(cfg)
    assert [os.path.basename(p) for p in glob.glob(str(folder / "train_state-*.pt"))] == [f"train_state-{kept}.pt"]
    saved = torch.load(folder / f"train_state-{kept}.pt", weights_only=True)
    sae = nn.make_sae(cfg.sae)
    sae.load_state_dict(saved["model"])
    assert saved["step"] == kept and all(torch.isfinite(t).all() for t in sae.state_dict().values())
    assert not (folder / "sae.pt").exists()


def test_non_finite_loss_of_one_member_names_it_and_its_step(store, tmp_path, monkeypatch):
    base = train_cfg(store, tmp_path, n_patches=20 * 128, ckpt_every=5, log_every=100)
    cfgs = [base, dataclasses.replace(with_sae(base, arch="relu", seed=1), lr=3e-4)]
    calls = []
    relu_forward = nn.ReluSAE.forward

    def diverging(self, x):  # the relu member's loss turns NaN at its 8th step (step 7)
        out = relu_forward(self, x)
        calls.append(1)
        if len(calls) >= 8:
            loss = out.loss._replace(total=out.loss.total * torch.tensor(math.nan))
            return out._replace(loss=loss)
        return out

    monkeypatch.setattr(nn.ReluSAE, "forward", diverging)
    with pytest.raises(UserError) as err:
        training.train_sweep(cfgs, show_progress=False)
    msg = str(err.value)
    relu_id = training.member_id(cfgs[1])
    assert f"SAE {relu_id} (relu" in msg and "non-finite loss at step 7" in msg and "(step 5;" in msg
    assert json.load(open(glob.glob(str(tmp_path / "group-*.json"))[0]))["step"] == 5


def test_train_cli_subprocess_prints_the_sweep_csv_last(store, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[sae]\nk = [2, 4]\n")
    out = subprocess.run(
        [sys.executable, "-m", "saev_core", "train", "--data.shard-root", store.path, "--data.layer", "-2",
         "--sae.d-vit", str(D), "--sae.arch", "topk", "--sae.exp-factor", "2", "--n-patches", "1024",
         "--sae-batch-size", "128", "--ckpt-path", str(tmp_path / "ckpts"), "--sweep", str(sweep)],
        capture_output=True, text=True, check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == str(tmp_path / "ckpts" / "sweep.csv")
    rows = pd.read_csv(lines[-1])
    assert sorted(rows["sae.k"]) == [2, 4] and all(os.path.exists(p) for p in rows["ckpt"])


def test_zero_sae_batch_size_is_a_clear_error(store, tmp_path, capsys):
    from saev_core.__main__ import main

    code = main(["train", "--data.shard-root", store.path, "--data.layer", "-2", "--sae.d-vit", str(D),
                 "--sae-batch-size", "0", "--ckpt-path", str(tmp_path / "ckpts")])
    assert code == 2 and "--sae-batch-size 0" in capsys.readouterr().err
