"""Splice-in fidelity: an exact reconstruction scores 1, zeros score the zero bound, and the number moves with the
SAE; checked against a plain re-computation with a hook written here."""

import json
import math

import numpy as np
import pytest
import torch

from saev_core import config, nn
from saev_core.__main__ import main
from saev_core.analysis import splice
from saev_core.record import vit as vitlib
from saev_core.store import ActivationStore, stats
from tests.helpers import exact_relu_sae, tiny_run

LAYER = 0  # block 0 of the 2-block tiny ViT: block 1 mixes the patches into the CLS token that is pooled


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_ckpt):
    return tiny_run(tmp_path_factory.mktemp("splice"), tiny_clip_ckpt, layer=LAYER)


@pytest.fixture(scope="module")
def evaluator(run):
    _, store_path, ckpt = run
    sae = nn.load(ckpt)
    on = splice.trained_on(ckpt, sae)
    store = ActivationStore.open(store_path)
    pixels = splice.held_out_pixels(store, on, vitlib.make_img_transform(on.vit_family, on.vit_ckpt), None)
    mean = torch.as_tensor(stats.raw_stats(store, LAYER, "patches")[0], dtype=torch.float32)
    ev = splice.SpliceEvaluator(vitlib.make_vit(on.vit_family, on.vit_ckpt), LAYER, "patches", mean, pixels)
    yield ev, sae, store, on
    ev.close()


def identity_sae(d: int) -> nn.SparseAutoencoder:
    """An SAE whose reconstruction is exact."""
    return exact_relu_sae(d).eval()


def plain_zero_ablation_cosine(ev: splice.SpliceEvaluator) -> float:
    """The zero bound recomputed independently: a hook of our own zeroes the patch tokens of block LAYER."""
    vit = ev.vit

    def zero_patches(module, inputs, output):
        out = output.clone()
        out[:, vit.n_prefix_tokens :] = 0
        return out

    with torch.no_grad():
        plain = vit(ev.pixels).numpy().astype(np.float64)
        handle = vit.residual_blocks[LAYER].register_forward_hook(zero_patches)
        try:
            zeroed = vit(ev.pixels).numpy().astype(np.float64)
        finally:
            handle.remove()
    cos = (plain * zeroed).sum(1) / np.linalg.norm(plain, axis=1) / np.linalg.norm(zeroed, axis=1)
    return float(cos.mean())


def test_exact_reconstruction_scores_one_and_recovers_the_whole_gap(evaluator):
    ev, *_ = evaluator
    result = ev.evaluate(identity_sae(64))
    assert result.cos_sae == pytest.approx(1.0, abs=1e-9)
    assert result.gap_recovered == pytest.approx(1.0, abs=1e-6)
    assert result.cos_zero < 0.999  # the ablation really changes the embedding, so the gap is not 0/0


def test_zero_ablation_is_its_own_bound_and_matches_a_plain_recomputation(evaluator):
    ev, *_ = evaluator
    zero = nn.make_sae(config.SparseAutoencoderConfig(d_vit=64, exp_factor=2, arch="relu"))
    with torch.no_grad():
        for p in (zero.W_dec, zero.b_dec):
            p.zero_()
    result = ev.evaluate(zero)
    assert result.cos_sae == pytest.approx(result.cos_zero, abs=1e-12)
    assert result.gap_recovered == pytest.approx(0.0, abs=1e-9)
    assert result.cos_zero == pytest.approx(plain_zero_ablation_cosine(ev), abs=1e-6)


def test_perturbing_the_sae_changes_the_score(evaluator):
    ev, sae, *_ = evaluator
    before = ev.evaluate(sae)
    perturbed = type(sae)(sae.cfg)
    perturbed.load_state_dict(sae.state_dict())
    with torch.no_grad():
        perturbed.W_dec.add_(0.5 * torch.randn_like(perturbed.W_dec))
    after = ev.evaluate(perturbed)
    assert abs(after.cos_sae - before.cos_sae) > 1e-4
    assert after.gap_recovered == pytest.approx((after.cos_sae - after.cos_zero) / (1 - after.cos_zero))


def test_gap_is_nan_when_the_ablation_changes_nothing():
    assert math.isnan(splice.gap_recovered(0.9, 1.0))


def test_held_out_images_are_the_loaders_split(evaluator):
    from saev_core.store import loader

    ev, _, store, on = evaluator
    _, val = loader.split_images(store, on.val_frac, on.seed)
    assert len(ev.pixels) == len(val) > 0


def test_evaluate_cli_prints_the_scores(run, capsys):
    _, _, ckpt = run
    assert main(["evaluate", "--ckpt", ckpt, "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert set(result) >= {"cos_sae", "cos_zero", "cos_mean", "gap_recovered", "n_images"}
    assert "gap recovered" in out[-2]


def test_report_gains_splice_columns_when_the_pipeline_asks(run, tmp_path):
    import os

    from saev_core.analysis import report
    from saev_core.errors import UserError
    from saev_core.pipeline import file as pipeline_file

    _, _, ckpt = run
    csv = os.path.join(os.path.dirname(os.path.dirname(ckpt)), "sweep.csv")
    [expected] = splice.evaluate_checkpoints([ckpt], device="cpu")
    import pandas as pd

    from saev_core.analysis import controls

    sweep = controls.SweepControls(pd.read_csv(csv), None, [])
    facts = report.RunFacts(n_train_vectors=1000)
    rep = report.layer_report(LAYER, sweep, None, facts, {ckpt: expected})
    [row] = report.member_rows([rep])
    assert row["splice_cos"] == expected.cos_sae and row["splice_gap_recovered"] == expected.gap_recovered
    assert "splice_gap_recovered" in report.markdown_table(rep.table)
    plain = report.layer_report(LAYER, sweep, None, facts)
    assert "splice_cos" not in plain.table

    base = "[activations]\nvit_family = 'clip'\nvit_ckpt = 'ViT-B-32/openai'\nvit_layers = [-2]\n"
    good = tmp_path / "good.toml"
    good.write_text(base + "[report]\nsplice = true\nsplice_max_images = 8\n")
    plan = pipeline_file.load_pipeline(str(good)).report
    assert plan.splice is True and plan.splice_max_images == 8
    bad = tmp_path / "bad.toml"
    bad.write_text(base + "[report]\nsplice = 'yes'\n")
    with pytest.raises(UserError, match="report.splice"):
        pipeline_file.load_pipeline(str(bad))
