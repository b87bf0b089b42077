"""SAE variants, checked against plain re-implementations written here (not the module's helpers)."""

import json
import os

import numpy as np
import pytest
import torch

from saev_core import config, nn
from saev_core.errors import UserError
from tests.helpers import exact_relu_sae

D_VIT, EXP, BATCH = 16, 4, 32
D_SAE = D_VIT * EXP
ARCHS = ["relu", "relu-decnorm", "topk", "batchtopk", "jumprelu"]


def cfg(**kw) -> config.SparseAutoencoderConfig:
    base = dict(d_vit=D_VIT, exp_factor=EXP, k=4, k_aux=8, sparsity_coeff=0.01)
    return config.SparseAutoencoderConfig(**{**base, **kw})


def acts(seed: int = 0, n: int = BATCH) -> torch.Tensor:
    return torch.randn(n, D_VIT, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def make(arch: str, normalised: bool = True, **kw) -> nn.SparseAutoencoder:
    """An SAE with non-trivial biases and (optionally) non-identity normalisation."""
    sae = nn.make_sae(cfg(arch=arch, **kw))
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(D_VIT, generator=gen) * 0.1)
    if normalised:
        sae.set_normalization(torch.randn(D_VIT, generator=gen), 0.4)
    return sae


def norm(sae, x):
    return (x - sae.mean) * sae.scale


def ref_mse(x_n, x_hat_n):
    """saev 0.1.0's loss MSE (``safe_mse(x_hat, x).mean()``): the squared error averaged over every element, batch
    and d_vit alike."""
    n, d = x_n.shape
    return ((x_n - x_hat_n) ** 2).sum() / (n * d)


def ref_kth_largest_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    kth = values.sort(descending=True).values[..., k - 1 : k]
    return values >= kth


# ---------------------------------------------------------------------------------------------------------------
# Forward passes vs. plain re-implementations
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_relu_forward_matches_saev_formula(training):
    sae = make("relu").train(training)
    x = acts()
    x_hat, f_x, loss = sae(x)
    x_n = norm(sae, x)
    f = torch.relu((x_n - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat_n = f @ sae.W_dec + sae.b_dec
    mse = ref_mse(x_n, x_hat_n)
    l1 = f.abs().sum(dim=1).mean()
    torch.testing.assert_close(f_x, f, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_hat, x_hat_n / 0.4 + sae.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.mse, mse)
    torch.testing.assert_close(loss.sparsity, 0.01 * l1)
    torch.testing.assert_close(loss.total, mse + 0.01 * l1)
    assert loss.aux == 0


def test_relu_decnorm_forward_weights_l1_by_decoder_norms_and_has_no_pre_encoder_bias():
    sae = make("relu-decnorm")
    x = acts()
    x_hat, f_x, loss = sae(x)
    x_n = norm(sae, x)
    f = torch.relu(x_n @ sae.W_enc + sae.b_enc)
    x_hat_n = f @ sae.W_dec + sae.b_dec
    penalty = sum(f[:, i] * sae.W_dec[i].norm() for i in range(D_SAE)).mean()
    torch.testing.assert_close(f_x, f, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_hat, x_hat_n / 0.4 + sae.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.total, ref_mse(x_n, x_hat_n) + 0.01 * penalty)


def test_relu_decnorm_init_rows_have_decoder_init_norm_and_encoder_is_decoder_transposed():
    sae = nn.make_sae(cfg(arch="relu-decnorm", decoder_init_norm=0.3))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.3))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


@pytest.mark.parametrize("training", [False, True])
def test_topk_forward_keeps_exactly_k_largest_per_row(training):
    sae = make("topk").train(training)
    x = acts()
    x_hat, f_x, loss = sae(x)
    x_n = norm(sae, x)
    pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert (pre.sort(descending=True).values[:, 3] > 0).all()  # the k largest are positive here
    f = torch.relu(pre) * ref_kth_largest_mask(pre, 4)
    torch.testing.assert_close(f_x, f, atol=1e-5, rtol=0)
    assert ((f_x != 0).sum(dim=1) == 4).all()
    x_hat_n = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(x_hat, x_hat_n / 0.4 + sae.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.mse, ref_mse(x_n, x_hat_n))
    assert loss.sparsity == 0


def test_batchtopk_training_keeps_batch_times_k_largest_over_the_batch():
    sae = make("batchtopk").train()
    x = acts()
    _, f_x, _ = sae(x)
    pre = (norm(sae, x) - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = torch.relu(pre) * ref_kth_largest_mask(pre.flatten(), BATCH * 4).view_as(pre)
    torch.testing.assert_close(f_x, f, atol=1e-5, rtol=0)
    assert (f_x != 0).sum() == BATCH * 4
    assert not ((f_x != 0).sum(dim=1) == 4).all()  # per-row counts vary: it is not per-row TopK


def test_batchtopk_threshold_is_set_by_first_batch_then_a_running_mean():
    sae = make("batchtopk").train()
    _, f1, _ = sae(acts(1))
    first = f1[f1 > 0].min()
    torch.testing.assert_close(sae.threshold, first)
    _, f2, _ = sae(acts(2))
    torch.testing.assert_close(sae.threshold, 0.99 * first + 0.01 * f2[f2 > 0].min())


def test_batchtopk_eval_thresholds_with_the_threshold_buffer():
    sae = make("batchtopk").eval()
    sae.threshold.fill_(0.7)
    x = acts()
    _, f_x, _ = sae(x)
    pre = (norm(sae, x) - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(f_x, pre * (pre > 0.7), atol=1e-5, rtol=0)
    assert (f_x != 0).any() and (f_x == 0).any()


@pytest.mark.parametrize("training", [False, True])
def test_jumprelu_forward_zero_below_threshold_and_l0_loss(training):
    sae = make("jumprelu", jumprelu_init_threshold=0.2).train(training)
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(0.0, 1.0, D_SAE))
    x = acts()
    x_hat, f_x, loss = sae(x)
    x_n = norm(sae, x)
    pre = (x_n - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = torch.where(pre > sae.threshold, torch.relu(pre), 0.0)
    torch.testing.assert_close(f_x, f, atol=1e-5, rtol=0)
    assert (f_x[pre <= sae.threshold] == 0).all()
    x_hat_n = f @ sae.W_dec + sae.b_dec
    l0 = (pre > sae.threshold).float().sum(dim=1).mean()
    torch.testing.assert_close(loss.sparsity, 0.01 * l0)
    torch.testing.assert_close(loss.total, ref_mse(x_n, x_hat_n) + 0.01 * l0)


def test_jumprelu_threshold_gets_straight_through_gradient():
    eps, theta = 0.5, 0.3
    sae = make("jumprelu", jumprelu_init_threshold=theta, jumprelu_bandwidth=eps)
    x = acts()
    _, _, loss = sae(x)
    loss.sparsity.backward()
    pre = ((norm(sae, x) - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    in_window = ((pre - theta).abs() < eps / 2).float()
    expected = 0.01 * (-1 / eps) * in_window.sum(dim=0) / BATCH  # d/dθ of coeff * mean_b sum_i H(pre - θ)
    torch.testing.assert_close(sae.threshold.grad, expected)
    assert (sae.threshold.grad != 0).any()

    sae.zero_grad()
    _, _, loss = sae(x)
    loss.mse.backward()  # the reconstruction also moves the threshold, through the JumpReLU's own STE
    assert (sae.threshold.grad != 0).any()


def test_initial_jumprelu_threshold_is_the_configured_raw_value():
    sae = nn.make_sae(cfg(arch="jumprelu", jumprelu_init_threshold=0.05))
    assert torch.equal(sae.threshold.detach(), torch.full((D_SAE,), 0.05))


# ---------------------------------------------------------------------------------------------------------------
# AuxK and dead latents
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_gradient_reaches_only_dead_latents(arch):
    sae = make(arch, normalised=False, dead_after_n_patches=100, k_aux=16, auxk_alpha=0.5)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[3, 10, 20, 41, 63]] = True
    with torch.no_grad():
        sae.n_patches_since_fired[dead] = 100
        sae.b_enc[dead] = 2.0  # so dead latents' pre-activations are positive and carry gradient
    x = acts()
    x_hat, f_x, loss = sae(x)
    loss.aux.backward()
    col_grad = sae.W_enc.grad.abs().sum(dim=0)
    assert (col_grad[~dead] == 0).all()
    assert (col_grad[dead] > 0).all()
    assert (sae.W_dec.grad[~dead] == 0).all()

    # The value: dead latents (all of them, as k_aux >= 5) reconstruct the detached residual / its variance.
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    residual = (x - x_hat).detach()
    recon = torch.relu(pre[:, dead]) @ sae.W_dec[dead].detach()
    expected = 0.5 * ((recon - residual) ** 2).sum() / ((residual - residual.mean(dim=0)) ** 2).sum()
    torch.testing.assert_close(loss.aux, expected)


def test_auxk_is_zero_without_dead_latents():
    sae = make("topk", dead_after_n_patches=100)
    assert sae(acts()).loss.aux == 0


def test_every_arch_the_config_accepts_has_a_variant_and_no_other():
    """check_config validates against the config's arch names; make_sae builds from the variants' table."""
    assert tuple(nn.ARCHS) == nn.ARCH_NAMES == tuple(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_patches_since_fired_counts_in_training_only_for_every_arch(arch):
    sae = make(arch).eval()
    _, f_x, _ = sae(acts())
    assert (sae.n_patches_since_fired == 0).all()
    sae.train()
    with torch.no_grad():
        sae.n_patches_since_fired.fill_(7)
        sae.b_enc[:5] = -100.0  # five latents that cannot fire on these inputs
    _, f_x, _ = sae(acts())
    fired = (f_x > 0).any(dim=0)
    assert fired.any() and not fired[:5].any()
    assert (sae.n_patches_since_fired[fired] == 0).all()
    assert (sae.n_patches_since_fired[~fired] == 7 + BATCH).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_dead_latents_are_those_idle_for_dead_after_n_patches(arch):
    sae = make(arch, dead_after_n_patches=50)
    with torch.no_grad():
        sae.n_patches_since_fired.copy_(torch.arange(D_SAE) * 2)  # 0, 2, ..., 126
    assert sae.dead_latents().tolist() == [2 * i >= 50 for i in range(D_SAE)]
    unset = make(arch)  # None: the nominal window, 10 million patches
    with torch.no_grad():
        unset.n_patches_since_fired[3] = 10_000_000
        unset.n_patches_since_fired[4] = 9_999_999
    assert unset.dead_latents().nonzero().flatten().tolist() == [3]


# ---------------------------------------------------------------------------------------------------------------
# Matryoshka
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_matryoshka_loss_is_mean_of_prefixes_reconstructing_alone(arch):
    sae = make(arch, n_prefixes=3, k=8).train()
    assert sae.prefix_sizes == (16, 32, 64)  # geometric: d_sae/4, d_sae/2, d_sae
    x = acts()
    x_hat, f_x, loss = sae(x)
    x_n = norm(sae, x)
    mses = [ref_mse(x_n, f_x[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in (16, 32, 64)]
    torch.testing.assert_close(loss.mse, sum(mses) / 3)
    torch.testing.assert_close(x_hat, (f_x @ sae.W_dec + sae.b_dec) / 0.4 + sae.mean, atol=1e-5, rtol=1e-5)


def test_matryoshka_decode_prefix_uses_only_first_m_latents():
    sae = make("topk", normalised=False, n_prefixes=2, k=8)
    _, f_x, _ = sae(acts())
    m = 32
    perturbed = f_x.clone()
    perturbed[:, m:] += torch.rand_like(perturbed[:, m:]) + 1
    assert torch.equal(sae.decode_prefix(f_x, m), sae.decode_prefix(perturbed, m))
    torch.testing.assert_close(sae.decode_prefix(f_x, m), f_x[:, :m] @ sae.W_dec[:m] + sae.b_dec)
    assert not torch.allclose(sae.decode_prefix(f_x, D_SAE), sae.decode_prefix(perturbed, D_SAE))


# ---------------------------------------------------------------------------------------------------------------
# Decoder constraints and hooks
# ---------------------------------------------------------------------------------------------------------------


def test_relu_normalize_w_dec_gives_unit_rows_and_remove_parallel_grads_leaves_orthogonal_grad():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=torch.Generator().manual_seed(0)) * 3 + 0.1)
    sae.normalize_w_dec()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))

    sae(acts()).loss.total.backward()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() > 1e-3
    sae.remove_parallel_grads()
    # What is left of the parallel part is float32 rounding: relative to each row's gradient, not absolute.
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs()
    assert (parallel <= 1e-5 * sae.W_dec.grad.norm(dim=1) + 1e-9).all(), parallel.max()


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_optimizer_hooks_keep_decoder_rows_unit_norm(arch):
    sae = make(arch).train()
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    sae(acts()).loss.total.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))


def test_relu_decnorm_hooks_leave_decoder_norms_free():
    sae = make("relu-decnorm").train()
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    sae(acts()).loss.total.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1))


# ---------------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------------


def test_normalisation_returns_x_hat_in_raw_space_perfect_reconstruction():
    # f = [relu(x_n), relu(-x_n)] and W_dec = [I; -I] reconstruct x_n exactly; x_hat must then equal raw x.
    sae = exact_relu_sae(D_VIT)
    mean = torch.randn(D_VIT)
    sae.set_normalization(mean, 0.25)
    x = acts()
    x_hat, f_x, loss = sae(x)
    torch.testing.assert_close(x_hat, x, atol=1e-5, rtol=1e-5)
    assert loss.mse < 1e-8
    torch.testing.assert_close(f_x[:, :D_VIT] - f_x[:, D_VIT:], (x - mean) * 0.25)


def test_init_b_dec_sets_decoder_bias():
    sae = make("topk")
    mu = torch.randn(D_VIT)
    sae.init_b_dec(mu)
    assert torch.equal(sae.b_dec.detach(), mu)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_dump_then_load_gives_identical_state_and_latents(tmp_path, arch):
    extra = {"n_prefixes": 2} if arch in ("topk", "batchtopk") else {}
    sae = make(arch, **extra).train()
    sae(acts(5))  # move the running buffers away from their defaults
    sae.eval()
    path = nn.dump(tmp_path / "member0" / "sae.pt", sae, provenance={"layer": -2, "store_key": "abc123"})
    assert os.listdir(tmp_path / "member0") == ["sae.pt"]  # no temporary file left behind

    loaded = nn.load(path)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert loaded.provenance == {"layer": -2, "store_key": "abc123"}
    assert not loaded.training
    want, got = sae.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and {"mean", "scale"} <= set(got)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    x = acts(6)
    assert torch.equal(sae(x).f_x, loaded(x).f_x)  # normalisation travels in the checkpoint


def test_checkpoint_header_is_one_json_line(tmp_path):
    sae = make("topk")
    nn.dump(tmp_path, sae)  # a folder gets sae.pt
    with open(tmp_path / "sae.pt", "rb") as f:
        header = json.loads(f.readline())
    assert header["schema"] == 1 and header["arch"] == "topk"
    assert header["d_vit"] == D_VIT and header["d_sae"] == D_SAE
    assert header["cfg"]["k"] == 4 and header["provenance"] == {}


def test_dump_replaces_an_existing_checkpoint(tmp_path):
    nn.dump(tmp_path / "sae.pt", nn.make_sae(cfg(arch="relu", seed=1)))
    nn.dump(tmp_path / "sae.pt", nn.make_sae(cfg(arch="relu", seed=2)))
    assert nn.load(tmp_path / "sae.pt").cfg.seed == 2
    assert os.listdir(tmp_path) == ["sae.pt"]


def test_saev_0_1_0_checkpoint_loads_and_encodes_as_saev_did(tmp_path):
    gen = torch.Generator().manual_seed(9)
    d_vit, d_sae = 8, 32
    state = {
        "W_enc": torch.randn(d_vit, d_sae, generator=gen),
        "b_enc": torch.randn(d_sae, generator=gen),
        "W_dec": torch.randn(d_sae, d_vit, generator=gen),
        "b_dec": torch.randn(d_vit, generator=gen),
    }
    header = {
        "d_vit": d_vit,
        "exp_factor": 4,
        "sparsity_coeff": 0.0004,
        "n_reinit_samples": 524288,
        "ghost_grads": False,
        "remove_parallel_grads": True,
        "normalize_w_dec": True,
        "seed": 0,
    }
    path = tmp_path / "sae.pt"
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(state, f)

    sae = nn.load(path)
    assert sae.cfg.arch == "relu" and sae.cfg.d_sae == d_sae and sae.cfg.sparsity_coeff == 0.0004
    assert torch.equal(sae.mean, torch.zeros(d_vit)) and sae.scale == 1
    x = torch.randn(10, d_vit, generator=gen)
    x_hat, f_x, _ = sae(x)
    f = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(f_x, f, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_hat, f @ state["W_dec"] + state["b_dec"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
def test_checkpoint_of_the_previous_version_loads(tmp_path, arch):
    """Before every variant counted firing, relu and jumprelu files had no n_patches_since_fired, and every header
    had an integer dead_after_n_patches."""
    sae = nn.make_sae(cfg(arch=arch))
    state = {k: v for k, v in sae.state_dict().items() if arch == "topk" or k != "n_patches_since_fired"}
    old_cfg = {
        "d_vit": D_VIT,
        "exp_factor": EXP,
        "arch": arch,
        "sparsity_coeff": 0.01,
        "k": 4,
        "n_prefixes": 1,
        "auxk_alpha": 1 / 32,
        "k_aux": 8,
        "dead_after_n_patches": 10_000_000,
        "jumprelu_init_threshold": 0.001,
        "jumprelu_bandwidth": 0.001,
        "decoder_init_norm": 0.1,
        "seed": 0,
    }
    header = {"schema": 1, "arch": arch, "cfg": old_cfg, "d_vit": D_VIT, "d_sae": D_SAE, "provenance": {"layer": -2}}
    path = tmp_path / "sae.pt"
    with open(path, "wb") as f:
        f.write((json.dumps(header) + "\n").encode())
        torch.save(state, f)
    loaded = nn.load(path)
    assert loaded.cfg.dead_after_n_patches == 10_000_000 and loaded.provenance == {"layer": -2}
    assert (loaded.n_patches_since_fired == 0).all()
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    "content",
    [
        b"",
        bytes(range(256)) * 8,
        b'{"hello": "world"}\n',
        b'{"d_vit": 8, "exp_factor": 4}\nnot a state dict',
        b'{"schema": 1, "arch": "relu"}\n',
        b'{"schema": 99, "cfg": {}}\n',
    ],
    ids=["empty", "random-bytes", "json-without-header", "legacy-without-weights", "no-cfg", "future-schema"],
)
def test_not_a_checkpoint_raises_user_error_naming_the_path(tmp_path, content):
    path = tmp_path / "thing.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="thing.pt") as err:
        nn.load(path)
    assert "expected an SAE checkpoint" in str(err.value)


def test_missing_checkpoint_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.pt"):
        nn.load(tmp_path / "nope.pt")


def test_checkpoint_with_wrong_shapes_raises_user_error(tmp_path):
    path = tmp_path / "sae.pt"
    with open(path, "wb") as f:
        f.write(b'{"d_vit": 8, "exp_factor": 4}\n')
        torch.save(
            {"W_enc": torch.zeros(8, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 8), "b_dec": torch.zeros(8)},
            f,
        )
    with pytest.raises(UserError, match="sae.pt"):
        nn.load(path)


# ---------------------------------------------------------------------------------------------------------------
# Seeds, sparsity warm-up, configuration errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_identical_weights_and_different_seed_does_not(arch):
    a, b = nn.make_sae(cfg(arch=arch, seed=3)), nn.make_sae(cfg(arch=arch, seed=3))
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), key
    c = nn.make_sae(cfg(arch=arch, seed=4))
    assert not torch.equal(a.W_enc, c.W_enc) and not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("arch", ["relu", "relu-decnorm", "jumprelu"])
def test_sparsity_scale_changes_total_loss(arch):
    sae = make(arch)
    x = acts()
    full = sae(x).loss
    sae.sparsity_scale = 0.25
    quarter = sae(x).loss
    sae.sparsity_scale = 0.0
    none = sae(x).loss
    assert full.sparsity > 0
    torch.testing.assert_close(quarter.sparsity, 0.25 * full.sparsity)
    assert full.total > quarter.total > none.total
    torch.testing.assert_close(none.total, none.mse)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"arch": "relu", "n_prefixes": 2}, "n_prefixes"),
        ({"arch": "jumprelu", "n_prefixes": 3}, "n_prefixes"),
        ({"arch": "topk", "k": D_SAE + 1}, "k"),
        ({"arch": "batchtopk", "k": 0}, "k"),
        ({"arch": "topk", "n_prefixes": 0}, "n_prefixes"),
        ({"arch": "topk", "n_prefixes": 8}, "n_prefixes"),  # 64 >> 7 == 0: a prefix would be empty
        ({"arch": "gated"}, "arch"),
        ({"arch": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"arch": "relu-decnorm", "decoder_init_norm": -1.0}, "decoder_init_norm"),
        ({"arch": "relu", "sparsity_coeff": -0.1}, "sparsity_coeff"),
    ],
)
def test_invalid_config_raises_user_error_naming_field_and_value(kw, field):
    # Single-field ranges fail when the config is built, the others when the SAE is made: both name field=value.
    with pytest.raises(UserError, match=f"{field}={kw[field]!r}"):
        nn.make_sae(cfg(**kw))


def test_output_shapes():
    for arch in ARCHS:
        x_hat, f_x, loss = make(arch)(acts())
        assert x_hat.shape == (BATCH, D_VIT) and f_x.shape == (BATCH, D_SAE)
        assert all(v.shape == () for v in loss)


def test_batchtopk_calibrated_threshold_is_the_nk_th_largest_pre_activation():
    """Against numpy: over n vectors in batches, the threshold is the (n * k)-th largest pre-activation of all of
    them, so that exactly n * k values lie above or at it; the training-mode L0 is each batch's top-k count."""
    torch.manual_seed(0)
    sae = make("batchtopk", k=3)
    batches = [torch.randn(16, D_VIT) * 2 for _ in range(4)]
    out = sae.calibrate_threshold(batches)
    pre = np.concatenate([sae.pre_acts(sae.normalize(b)).detach().numpy().ravel() for b in batches])
    n = 16 * 4
    want = np.sort(pre)[::-1][n * 3 - 1]
    assert want > 0 and out["threshold"] == pytest.approx(float(want), rel=1e-6)
    assert float(sae.threshold) == pytest.approx(float(want), rel=1e-6)
    assert out["l0_train"] == pytest.approx(3.0)
    sae.eval()
    l0 = np.mean([(sae.encode(b) > 0).sum(dim=1).float().mean().item() for b in batches])
    assert l0 == pytest.approx(3.0 - 1 / n)  # strictly above the threshold: the (n*k)-th value itself is left out
