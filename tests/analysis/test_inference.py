"""Inference on new images: saev's snippet with our names, ``explain``, and both against the visuals pass."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import saev_core.activations
import saev_core.nn
from saev_core.analysis.inference import explain
from saev_core.errors import UserError
from saev_core.record import images
from saev_core.store import ActivationStore
from saev_core.visuals import top_images
from tests.helpers import tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_ckpt):
    """A store recorded with a RELATIVE ViT checkpoint path (from the run folder), and an SAE trained there."""
    root = tmp_path_factory.mktemp("inference")
    shutil.copy(tiny_clip_ckpt.partition("/")[2], root / "weights.pt")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        imgs, store, ckpt = tiny_run(root, tiny_clip_ckpt, vit_ckpt="saev-tiny-clip/weights.pt")
    finally:
        os.chdir(cwd)
    return imgs, store, ckpt


def test_provenance_records_absolute_paths(run):
    _, store, ckpt = run
    prov = saev_core.nn.load(ckpt).provenance
    assert prov["vit_ckpt"] == f"saev-tiny-clip/{os.path.dirname(os.path.dirname(store))}/weights.pt"
    assert os.path.isabs(prov["store"])


def test_snippet_explain_and_visuals_pass_give_the_same_latents(run, tmp_path, monkeypatch):
    imgs, store_path, ckpt = run
    monkeypatch.chdir(tmp_path)  # another folder than the one the ViT path was given from
    store = ActivationStore.open(store_path)
    sae = saev_core.nn.load(ckpt)
    cache = top_images.topk_pass(
        store, -1, "patches", sae, 4, top_images.CacheIdentity("x", store.metadata.key, -1, "patches", 4)
    )
    latent = int(np.argmax(cache.freq))
    image = int(cache.top_images[latent, 0])
    path = os.path.join(imgs, store.image_paths()[image])

    # The seed's snippet, as written, with our module names.
    vit_ckpt = sae.provenance["vit_ckpt"]
    img = images.load_rgb(path)
    img_transform = saev_core.activations.make_img_transform("clip", vit_ckpt)
    vit = saev_core.activations.make_vit("clip", vit_ckpt)
    recorded_vit = saev_core.activations.RecordedVisionTransformer(vit, 49, True, [-1])
    _, vit_acts = recorded_vit(img_transform(img)[None, ...])
    x_hat, f_x, loss = sae(vit_acts[:, 0, 1:, :])
    assert f_x.shape == (1, 49, sae.cfg.d_sae) and x_hat.shape == (1, 49, 64)
    snippet = f_x[0].detach().numpy()

    np.testing.assert_allclose(snippet[:, latent], cache.top_patches[latent, 0], rtol=1e-4, atol=1e-5)
    out = explain([path, img], ckpt, top_n=3, device="cpu", batch_size=1)
    np.testing.assert_allclose(out.patch_values[0], snippet, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.patch_values[1], snippet, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        out.cls_values[0], sae.encode(vit_acts[:, 0, 0]).detach().numpy()[0], rtol=1e-4, atol=1e-5
    )
    # Each image's top latents: the largest best-patch values, recomputed plainly from the snippet.
    best = snippet.max(axis=0)
    assert set(out.top_latents[0].tolist()) == set(np.argsort(-best)[:3].tolist())
    np.testing.assert_allclose(out.top_values[0], np.sort(best)[::-1][:3], rtol=1e-4, atol=1e-5)
    # Every kept image of every latent agrees with the pass, not just one.
    for lat in np.flatnonzero(cache.freq > 0)[:5]:
        for r in range(int(cache.n_images()[lat])):
            i = int(cache.top_images[lat, r])
            other = explain([os.path.join(imgs, store.image_paths()[i])], ckpt, top_n=1, device="cpu")
            np.testing.assert_allclose(other.patch_values[0, :, lat], cache.top_patches[lat, r], rtol=1e-4, atol=1e-5)
    heat = out.heatmaps[0][0]
    assert heat.width == img.width and heat.height > img.height  # the CLS strip below, never enlarged
    assert np.asarray(heat)[: img.height].tolist() != np.asarray(img).tolist()  # something is drawn


def test_saev_0_1_0_file_needs_the_vit_named(run, tmp_path):
    imgs, store_path, ckpt = run
    sae = saev_core.nn.load(ckpt)
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        f.write((json.dumps({"d_vit": 64, "exp_factor": 2, "sparsity_coeff": 4e-4}) + "\n").encode())
        torch.save({k: getattr(sae, k).detach() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, f)
    first = os.path.join(imgs, "cat", sorted(os.listdir(os.path.join(imgs, "cat")))[0])
    with pytest.raises(UserError, match="vit_family, vit_ckpt, layer"):
        explain([first], legacy, device="cpu")
    out = explain(
        [first],
        legacy,
        device="cpu",
        vit_family="clip",
        vit_ckpt=sae.provenance["vit_ckpt"],
        layer=-1,
        store=store_path,
    )
    assert out.patch_values.shape == (1, 49, 128)


def test_unreadable_image_is_a_user_error(run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.png"):
        explain([str(bad)], run[2], device="cpu")


def test_bad_calls_through_the_public_api_get_one_clear_message(run):
    """explain([]), a single path, wrong-size tensors and per-patch values, top_n 0: each a UserError that says what
    to pass (not numpy's or torch's error from deep inside)."""
    from PIL import Image

    from saev_core.analysis.inference import Explainer

    imgs, _, ckpt = run
    path = os.path.join(imgs, sorted(os.listdir(imgs))[0])
    path = os.path.join(path, sorted(os.listdir(path))[0]) if os.path.isdir(path) else path
    with pytest.raises(UserError, match="No images to explain"):
        explain([], ckpt, device="cpu")
    explainer = Explainer.from_checkpoint(ckpt, "cpu")
    assert explainer.input_shape == (3, 224, 224)  # the tiny config's image_size; 7x7 patches of 32
    for bad in [torch.zeros(3, 224, 224), torch.zeros(1, 3, 32, 32), torch.zeros(0, 3, 224, 224)]:
        with pytest.raises(UserError, match=r"Explainer.latents takes a tensor \[images, 3, 224, 224\]"):
            explainer.latents(bad)
    with pytest.raises(UserError, match=r"one latent's value per patch, shape \[49\]"):
        explainer.heatmap(Image.new("RGB", (64, 64)), np.zeros(48))
    with pytest.raises(UserError, match="top_n 0"):
        explainer([path], top_n=0)
    one = explainer(path, top_n=2)  # one path alone is one image, not a sequence of letters
    assert one.top_latents.shape == (1, 2)


def test_a_layer_the_sae_was_not_trained_on_is_refused_unless_allowed(run):
    """The tiny ViT has 2 blocks; the SAE was trained on layer -1 (block 1). Layer 1 is the same block; layer 0 is
    another, refused unless allow_layer_mismatch."""
    imgs, _, ckpt = run
    path = next(os.path.join(d, f) for d, _, fs in sorted(os.walk(imgs)) for f in sorted(fs))
    assert saev_core.nn.load(ckpt).provenance["layer"] == -1
    with pytest.raises(UserError, match=r"layer=0 is not the layer the SAE .* was trained on.*allow_layer_mismatch"):
        explain([path], ckpt, device="cpu", layer=0)
    same = explain([path], ckpt, device="cpu", layer=1)
    default = explain([path], ckpt, device="cpu")
    np.testing.assert_array_equal(same.image_values, default.image_values)
    other = explain([path], ckpt, device="cpu", layer=0, allow_layer_mismatch=True)
    assert other.image_values.shape == default.image_values.shape
