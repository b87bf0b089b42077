"""Sparse topk / batchtopk training against the dense path, its reference (plain autograd through the dense
matmuls, itself checked against written-out formulas in test_nn.py).

Both paths start from the same weights and see the same batches through ``trainer.train_step`` (the trainer's own
step: schedule, backward, parallel-gradient removal, clipping, Adam, renormalisation); after many steps their
weights, buffers and Adam states must agree. float64 makes the tolerance tight; float32 is what training uses.
"""

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from saev_core import config, nn
from saev_core.nn import sparse_topk
from saev_core.store import write_store
from saev_core.train import trainer

DEVICE = os.environ.get("SAEV_TEST_DEVICE", "cpu")
D_VIT, EXP = 16, 8
D_SAE = D_VIT * EXP
BATCH = 64
VARIANTS = [("topk", 1), ("topk", 3), ("batchtopk", 1), ("batchtopk", 3)]  # (arch, n_prefixes): 3 is Matryoshka


def sae_cfg(arch: str, n_prefixes: int, **kw) -> config.SparseAutoencoderConfig:
    # A short dead window: latents that miss two batches count as dead, so AuxK has work in most steps.
    base = dict(
        d_vit=D_VIT,
        exp_factor=EXP,
        arch=arch,
        k=4,
        k_aux=12,
        n_prefixes=n_prefixes,
        dead_after_n_patches=2 * BATCH,
        auxk_alpha=0.5,
        seed=3,
    )
    return config.SparseAutoencoderConfig(**{**base, **kw})


def batches(n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # A few directions carry most of the variance, so some latents stop firing and AuxK has dead latents to use.
    mix = torch.randn(D_VIT, D_VIT, generator=gen) * torch.logspace(0, -2, D_VIT)[:, None]
    return [(torch.randn(BATCH, D_VIT, generator=gen) @ mix * 3 + 1).to(DEVICE, dtype) for _ in range(n)]


def member_pair(cfg: config.SparseAutoencoderConfig, dtype: torch.dtype) -> tuple[trainer.Member, trainer.Member]:
    """Two members with the same weights: the dense reference and the sparse path."""
    sae = nn.make_sae(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(D_VIT, generator=gen) * 0.1)
    sae.set_normalization(torch.randn(D_VIT, generator=gen) * 0.5, 0.3)
    train_cfg = config.TrainConfig(sae=cfg, lr=1e-2, n_lr_warmup=3, max_grad_norm=1.0)
    members = []
    for sparse in (False, True):
        copy_ = copy.deepcopy(sae).to(DEVICE, dtype).train()
        copy_.sparse_training = sparse
        members.append(trainer.Member(train_cfg, "", "", copy_, torch.optim.Adam(copy_.parameters(), lr=1e-2)))
    return members[0], members[1]


def assert_states_close(a: nn.SparseAutoencoder, b: nn.SparseAutoencoder, atol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if sa[key].dtype == torch.long:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sb[key], sa[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("arch,n_prefixes", VARIANTS)
@pytest.mark.parametrize("dtype,n_steps,atol", [(torch.float64, 20, 1e-9), (torch.float32, 8, 2e-4)])
def test_sparse_training_ends_at_the_dense_weights(arch, n_prefixes, dtype, n_steps, atol):
    dense, sparse = member_pair(sae_cfg(arch, n_prefixes), dtype)
    aux_steps, moved = 0, 0.0
    start = {k: v.clone() for k, v in dense.sae.state_dict().items()}
    for step, x in enumerate(batches(n_steps, dtype)):
        s_dense = trainer.train_step(dense, x, step, n_steps, with_stats=True)
        s_sparse = trainer.train_step(sparse, x, step, n_steps, with_stats=True)
        for key in s_dense:  # loss parts, l0 and l1 of every step
            torch.testing.assert_close(s_sparse[key], s_dense[key], atol=atol, rtol=atol, msg=f"{key} at step {step}")
        aux_steps += bool(s_dense["aux"] > 0)
    moved = (dense.sae.W_dec - start["W_dec"]).abs().max().item()
    assert aux_steps >= n_steps // 2, "AuxK must be active in most steps for this test to check it"
    assert moved > 100 * atol, "training must move the weights well beyond the tolerance"
    assert_states_close(dense.sae, sparse.sae, atol)
    for p_dense, p_sparse in zip(dense.sae.parameters(), sparse.sae.parameters()):  # Adam's moments too
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                sparse.optimizer.state[p_sparse][key], dense.optimizer.state[p_dense][key], atol=atol, rtol=0
            )


@pytest.mark.parametrize("arch,n_prefixes", VARIANTS)
def test_sparse_forward_gives_the_dense_outputs_and_gradients(arch, n_prefixes):
    dense, sparse = member_pair(sae_cfg(arch, n_prefixes), torch.float64)
    for m in (dense, sparse):
        m.sae.n_patches_since_fired[: D_SAE // 2] = m.sae.dead_after_n_patches  # half the latents dead
    x = batches(1, torch.float64, seed=5)[0]
    out_dense, out_sparse = dense.sae(x), sparse.sae(x)
    assert out_dense.loss.aux > 0
    torch.testing.assert_close(out_sparse.x_hat, out_dense.x_hat, atol=1e-12, rtol=0)
    torch.testing.assert_close(out_sparse.f_x, out_dense.f_x.detach(), atol=1e-12, rtol=0)
    for name in out_dense.loss._fields:
        torch.testing.assert_close(
            getattr(out_sparse.loss, name), getattr(out_dense.loss, name).detach(), atol=1e-12, rtol=0, msg=name
        )
    out_dense.loss.total.backward()
    out_sparse.loss.total.backward()
    for (name, p_dense), p_sparse in zip(dense.sae.named_parameters(), sparse.sae.parameters()):
        assert p_dense.grad.abs().max() > 0, name
        torch.testing.assert_close(p_sparse.grad, p_dense.grad, atol=1e-12, rtol=0, msg=name)
    assert_states_close(dense.sae, sparse.sae, 0.0)  # firing counters and the batchtopk threshold


def test_sparse_path_trains_only_in_training_mode():
    dense, sparse = member_pair(sae_cfg("batchtopk", 1), torch.float64)
    dense.sae.threshold.fill_(0.5)
    sparse.sae.threshold.fill_(0.5)
    x = batches(1, torch.float64)[0]
    with torch.no_grad():
        out_dense, out_sparse = dense.sae.eval()(x), sparse.sae.eval()(x)
    assert torch.equal(out_sparse.f_x, out_dense.f_x)  # eval: the JumpReLU threshold, not the batch top-k


def test_auto_picks_sparse_for_small_k_over_d_sae_and_dense_otherwise():
    def cfg(arch="topk", k=32, exp_factor=8):
        return config.SparseAutoencoderConfig(d_vit=768, exp_factor=exp_factor, arch=arch, k=k)

    assert sparse_topk.use_sparse("auto", cfg(k=32))  # 32 / 6144
    assert sparse_topk.use_sparse("auto", cfg(arch="batchtopk", k=128))
    assert sparse_topk.use_sparse("auto", cfg(k=512))  # 1/12: the boundary is sparse
    assert not sparse_topk.use_sparse("auto", cfg(k=513))
    assert not sparse_topk.use_sparse("auto", cfg(k=96, exp_factor=1))  # 96 / 768 > 1/12
    assert sparse_topk.use_sparse("on", cfg(k=6144))
    assert not sparse_topk.use_sparse("off", cfg(k=1))
    for arch in ("relu", "relu-decnorm", "jumprelu"):
        assert not sparse_topk.use_sparse("on", cfg(arch=arch))


def test_trainer_trains_sparse_when_asked_and_gets_the_dense_weights(tmp_path, monkeypatch):
    """Through train_sweep: the setting reaches the SAE, leaves the member id alone, and on/off give equal weights."""
    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(1, 40, 16, D_VIT)) * 2 + 1).astype(np.float32)
    store = write_store(
        str(tmp_path / "store"), acts, cls_token=False, imgs_per_shard=20, resolved_layers=(10,), fingerprint="sparse"
    )
    seen = []
    real_forward = sparse_topk.train_forward
    monkeypatch.setattr(sparse_topk, "train_forward", lambda sae, x: seen.append(1) or real_forward(sae, x))
    base = config.TrainConfig(
        data=config.DataLoadConfig(shard_root=store.path, layer=-2),
        sae=sae_cfg("topk", 1, exp_factor=4),
        n_patches=12 * 32,
        sae_batch_size=32,
        lr=1e-2,
        n_lr_warmup=2,
        ckpt_path=str(tmp_path / "ckpt"),
        device=DEVICE,
    )
    results = {}
    for setting in ("off", "on"):
        cfg = dataclasses.replace(base, sparse_topk=setting, ckpt_path=str(tmp_path / setting))
        n_before = len(seen)
        (results[setting],) = trainer.train_sweep([cfg], show_progress=False)
        assert (len(seen) > n_before) == (setting == "on")
    assert results["on"].member_id == results["off"].member_id
    assert_states_close(nn.load(results["off"].ckpt_path), nn.load(results["on"].ckpt_path), 1e-4)


@pytest.mark.parametrize("skewed_sample", [False, True])
def test_batch_topk_selection_is_the_flat_top_n(skewed_sample):
    """The sampled-threshold selection against a plain top-k of the flattened batch, also when the sample misleads
    (the sampled rows much larger than the rest: too few candidates pass, and the full top-k must take over)."""
    gen = torch.Generator().manual_seed(1)
    batch, d_sae, k = 1024, 96, 5
    pre = torch.randn(batch, d_sae, generator=gen, dtype=torch.float64)
    if skewed_sample:
        pre[:: batch // sparse_topk.SAMPLE_ROWS] += 10
    sel = sparse_topk.select_batch_topk(pre, k)
    expected = pre.flatten().topk(batch * k).indices.sort().values
    assert torch.equal(sel.row * d_sae + sel.lat, expected)
    assert torch.equal(sel.pre, pre.flatten()[expected])
