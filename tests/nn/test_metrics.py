"""ReconstructionMetrics against plain numpy float64 recomputations."""

import jaxtyping
import numpy as np
import pytest
import torch

from saev_core.nn.metrics import ReconstructionMetrics, sweep_health


def _feed(metrics, x, x_hat, f, sizes):
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        metrics.update(torch.as_tensor(x[sl]), torch.as_tensor(x_hat[sl]), torch.as_tensor(f[sl]))
        start += size
    assert start == len(x)
    return metrics.compute()


def _offset_data(n=1000, d=24, offset=1e3, seed=0):
    rng = np.random.default_rng(seed)
    return offset + rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=d)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5])
def test_predicting_the_held_out_mean_gives_ev_zero_even_with_a_large_offset(offset):
    x = _offset_data(offset=offset)
    mean = x.mean(axis=0, dtype=np.float64)
    x_hat = np.broadcast_to(mean, x.shape).copy()
    f = np.zeros((len(x), 8))
    out = _feed(ReconstructionMetrics(), x, x_hat, f, sizes=[1, 300, 7, 500, 192])
    assert abs(out["nmse"] - 1.0) < 1e-12
    assert abs(out["ev"]) < 1e-12


def test_perfect_reconstruction_gives_ev_one():
    x = _offset_data(offset=1e3)
    out = _feed(ReconstructionMetrics(), x, x.copy(), np.zeros((len(x), 4)), sizes=[333, 333, 334])
    assert out["nmse"] == 0.0
    assert out["ev"] == 1.0
    assert out["mse"] == 0.0


def test_nmse_and_mse_match_numpy_on_random_data_in_uneven_float32_batches():
    rng = np.random.default_rng(1)
    n, d = 777, 32
    x = (5.0 + rng.normal(size=(n, d))).astype(np.float32)
    x_hat = (x + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    f = np.maximum(rng.normal(size=(n, 16)), 0).astype(np.float32)
    out = _feed(ReconstructionMetrics(), x, x_hat, f, sizes=[100, 1, 250, 26, 400])

    x64, xh64 = x.astype(np.float64), x_hat.astype(np.float64)
    sse = ((x64 - xh64) ** 2).sum()
    denom = ((x64 - x64.mean(axis=0)) ** 2).sum()
    np.testing.assert_allclose(out["nmse"], sse / denom, rtol=1e-12)
    np.testing.assert_allclose(out["ev"], 1 - sse / denom, rtol=1e-12)
    np.testing.assert_allclose(out["mse"], sse / n, rtol=1e-12)
    np.testing.assert_allclose(out["mse_per_dim"], sse / n / d, rtol=1e-12)
    assert out["n"] == n and out["d_vit"] == d and out["d_sae"] == 16


def test_sparsity_statistics_match_numpy_on_planted_latents():
    rng = np.random.default_rng(2)
    n, d_sae = 1000, 12
    f = np.zeros((n, d_sae))
    # latents 0-2 never fire; 3 fires always; 4 fires once; 5-11 fire at random rates with random values.
    f[:, 3] = rng.uniform(0.5, 2.0, size=n)
    f[417, 4] = 3.25
    for j, rate in zip(range(5, 12), [0.005, 0.01, 0.02, 0.1, 0.3, 0.5, 0.9]):
        mask = rng.random(n) < rate
        f[mask, j] = rng.exponential(size=mask.sum()) + 1e-3
    x = rng.normal(size=(n, 6))
    out = _feed(ReconstructionMetrics(), x, x, f.astype(np.float32), sizes=[64] * 15 + [40])

    f32 = f.astype(np.float32).astype(np.float64)
    fires = f32 > 0
    freq = fires.mean(axis=0)
    np.testing.assert_allclose(out["firing_freq"], freq, rtol=0, atol=0)
    count = fires.sum(axis=0)
    expected_mean = np.array([f32[fires[:, j], j].mean() if count[j] else 0.0 for j in range(d_sae)])
    np.testing.assert_allclose(out["mean_value"], expected_mean, rtol=1e-12)
    assert out["mean_value"][4] == 3.25
    np.testing.assert_allclose(out["l0"], (f32 != 0).sum(axis=1).mean(), rtol=1e-12)
    np.testing.assert_allclose(out["l1"], np.abs(f32).sum(axis=1).mean(), rtol=1e-12)
    assert out["n_dead"] == 3 == (count == 0).sum()
    assert out["n_almost_dead"] == (freq < 1e-7).sum() == 3
    assert out["n_dense"] == (freq > 1e-2).sum()
    assert out["firing_freq"][3] == 1.0 and out["firing_freq"][4] == 1 / n
    assert out["frac_dead"] == 3 / d_sae
    assert out["frac_dense"] == out["n_dense"] / d_sae


def test_batch_order_and_split_do_not_change_the_metrics():
    rng = np.random.default_rng(3)
    x = 100 + rng.normal(size=(500, 8))
    x_hat = x + rng.normal(size=x.shape)
    f = np.maximum(rng.normal(size=(500, 5)), 0)
    a = _feed(ReconstructionMetrics(), x, x_hat, f, sizes=[500])
    b = _feed(ReconstructionMetrics(), x, x_hat, f, sizes=[1] * 10 + [490])
    for key in ["mse", "nmse", "l0", "l1"]:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-12)
    np.testing.assert_array_equal(a["firing_freq"], b["firing_freq"])


def test_compute_without_data_and_mismatched_shapes_raise():
    metrics = ReconstructionMetrics()
    with pytest.raises(ValueError, match="No vectors"):
        metrics.compute()
    # The run-time shape checker (tests' --jaxtyping-packages) may catch it before the ValueError.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match="x_hat"):
        metrics.update(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, 5))
    metrics.update(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="d_sae"):
        metrics.update(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 6))


def test_constant_data_has_undefined_nmse_not_a_crash():
    x = np.ones((10, 3))
    out = _feed(ReconstructionMetrics(), x, x, np.zeros((10, 2)), sizes=[4, 6])
    assert np.isnan(out["nmse"])
    out = _feed(ReconstructionMetrics(), x, x + 1, np.zeros((10, 2)), sizes=[10])
    assert out["nmse"] == np.inf


# ---------------------------------------------------------------------------------------------------------------
# The sweep's health rule
# ---------------------------------------------------------------------------------------------------------------


def _row(member_id, **kw):
    return {"member_id": member_id, "nmse": 0.2, "ev": 0.8, "mse": 10.0, "l0": 8.0, "l1": 30.0, **kw}


def test_sweep_health_counts_latents_dead_in_the_training_stream_not_on_the_held_out_split():
    rows = [
        _row("rare", frac_dead_train=0.10, frac_dead_heldout=0.60, **{"sae.dead_after_n_patches": 15_360}),
        _row("dead", frac_dead_train=0.70, frac_dead_heldout=0.75, **{"sae.dead_after_n_patches": 15_360}),
    ]
    health = sweep_health(rows, max_frac_dead=0.5)
    assert health.errors == [] and health.severity == "warn"  # most latents dead: a warning, not a block
    assert health.warnings == [
        "dead: 70.0% of its latents are dead (did not fire in the last 15,360 training vectors; bound 50%); "
        "75.0% never fired on the held-out split"
    ]
    assert (health.worst_frac_dead, health.worst_dead_member, health.max_frac_dead) == (0.70, "dead", 0.5)


def test_sweep_health_reads_frac_dead_from_rows_written_before_the_training_count():
    assert sweep_health([_row("old", frac_dead=0.2)], 0.5).problems == []
    [problem] = sweep_health([_row("old", frac_dead=0.9)], 0.5).problems
    assert problem.startswith("old: 90.0% of its latents are dead (did not fire in training; bound 50%)")


@pytest.mark.parametrize("bad", [{"frac_dead_train": float("nan")}, {"nmse": float("nan")}, {"l0": float("inf")}])
def test_nan_or_infinite_metrics_are_errors(bad):
    health = sweep_health([_row("ok", frac_dead_train=0.0), _row("x", **{"frac_dead_train": 0.0, **bad})], 0.5)
    assert health.errors == ["x: NaN or infinite values in its metrics"] and health.severity == "error"
    assert health.n_nan_members == 1 and health.best_member == "ok"


def test_an_all_dead_member_is_an_error_and_most_dead_a_warning():
    health = sweep_health([_row("a", frac_dead_train=1.0), _row("b", frac_dead_train=0.8)], 0.5)
    assert health.severity == "error"
    assert [p.split(":")[0] for p in health.errors] == ["a"] and "every latent is dead" in health.errors[0]
    assert [p.split(":")[0] for p in health.warnings] == ["b"]


def test_losing_to_a_control_at_matched_l0_is_a_warning_with_the_numbers():
    rows = [
        _row("best", nmse=0.30, frac_dead_train=0.0, pca_nmse_at_l0=0.25, random_nmse_at_l0=0.6),
        _row("worse", nmse=0.50, frac_dead_train=0.0, pca_nmse_at_l0=0.25, random_nmse_at_l0=0.4),
    ]
    health = sweep_health(rows, 0.5)
    assert health.severity == "warn" and len(health.warnings) == 1  # only the best member is held to the controls
    assert "best" in health.warnings[0] and "loses to PCA" in health.warnings[0] and "0.2500" in health.warnings[0]
    assert health.numbers()["best_pca_nmse_at_l0"] == 0.25 and health.numbers()["best_nmse"] == 0.30
    won = sweep_health([_row("best", nmse=0.2, frac_dead_train=0.0, pca_nmse_at_l0=0.25)], 0.5)
    assert won.severity == "ok" and won.problems == []


def test_the_best_nmse_bound_is_an_error():
    health = sweep_health([_row("a", frac_dead_train=0.0, nmse=0.4)], 0.5, max_nmse=0.3)
    assert health.severity == "error" and "above [checks] max_nmse 0.3" in health.errors[0]
