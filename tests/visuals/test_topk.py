"""The top-k pass against a brute-force computation over every activation, and its cache."""

import os

import numpy as np
import pytest
import torch

from saev_core import config, nn
from saev_core.errors import UserError
from saev_core.store import write_store
from saev_core.visuals import top_images, topk_cache

D, N_PATCHES = 8, 6


def make_sae(arch: str = "relu", seed: int = 0) -> nn.SparseAutoencoder:
    sae = nn.make_sae(config.SparseAutoencoderConfig(d_vit=D, exp_factor=4, arch=arch, k=3, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a bias that leaves some latents dead and some rare
        sae.b_enc.copy_(torch.randn(sae.cfg.d_sae, generator=gen) * 0.5 - 0.3)
        sae.set_normalization(torch.randn(D, generator=gen), 0.7)
    return sae.eval()


def plant(tmp_path, n_imgs=30, cls_token=True, valid=None, seed=0):
    n_tokens = N_PATCHES + int(cls_token)
    acts = np.random.default_rng(seed).normal(size=(1, n_imgs, n_tokens, D)).astype(np.float32)
    store = write_store(str(tmp_path / "store"), acts, cls_token=cls_token, imgs_per_shard=8, valid=valid)
    return store, acts[0]


def identity(store, patches="patches", k=4) -> top_images.CacheIdentity:
    return top_images.CacheIdentity("sae-hash", store.metadata.key, -2, patches, k)


def brute_force(sae, acts, patches, k, cls_token, images):
    """Every vector encoded at once; per latent, images sorted by (value desc, image asc), firing ones only."""
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(acts.reshape(-1, D))).reshape(*acts.shape[:2], -1).numpy()
    f = f[images]
    first = int(cls_token)
    patch_f = f[:, first:]
    rank = patch_f.max(axis=1) if patches == "patches" else f[:, 0]
    d_sae = f.shape[-1]
    values = np.zeros((d_sae, k), np.float32)
    imgs = np.full((d_sae, k), -1)
    rows = np.zeros((d_sae, k, acts.shape[1] - first), np.float32)
    for latent in range(d_sae):
        order = [i for i in np.lexsort((images, -rank[:, latent])) if rank[i, latent] > 0][:k]
        values[latent, : len(order)] = rank[order, latent]
        imgs[latent, : len(order)] = images[order]
        rows[latent, : len(order)] = patch_f[order, :, latent]
    mode_f = patch_f.reshape(-1, d_sae) if patches == "patches" else f[:, 0]
    return values, imgs, rows, mode_f, f


@pytest.mark.parametrize("patches", ["patches", "cls"])
@pytest.mark.parametrize("imgs_per_batch", [7, 1000])
def test_streaming_topk_equals_brute_force(tmp_path, patches, imgs_per_batch):
    valid = np.ones(30, bool)
    valid[[3, 17]] = False  # undecodable images never count
    store, acts = plant(tmp_path, valid=valid)
    sae = make_sae()
    got = top_images.topk_pass(store, -2, patches, sae, 4, identity(store, patches), imgs_per_batch=imgs_per_batch)
    images = np.flatnonzero(valid)
    values, imgs, rows, mode_f, f = brute_force(sae, acts, patches, 4, True, images)
    np.testing.assert_array_equal(got.top_images, imgs)
    np.testing.assert_allclose(got.top_values, values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.top_patches, rows, rtol=1e-5, atol=1e-6)
    for latent in range(f.shape[-1]):
        for slot, img in enumerate(imgs[latent]):
            if img >= 0:
                want = f[np.searchsorted(images, img), 0, latent]
                assert got.top_cls[latent, slot] == pytest.approx(want, rel=1e-5, abs=1e-6)
            else:
                assert np.isnan(got.top_cls[latent, slot])
    # Statistics over every vector of the token mode.
    fires = mode_f > 0
    np.testing.assert_allclose(got.freq, fires.mean(axis=0))
    mean_when_firing = np.where(fires.any(0), (mode_f * fires).sum(0) / np.maximum(fires.sum(0), 1), 0)
    np.testing.assert_allclose(got.mean_value, mean_when_firing, rtol=1e-5)
    for latent in range(f.shape[-1]):
        counts, _ = np.histogram(
            np.clip(np.log10(mode_f[fires[:, latent], latent]), -5.999, 3.999), top_images.HIST_EDGES
        )
        np.testing.assert_array_equal(got.hist[latent], counts)
    assert got.n_vectors == len(mode_f)
    # Exactly k distinct images where at least k fire; every latent list is distinct.
    n_firing = (
        (mode_f.reshape(len(images), -1, f.shape[-1]) > 0).any(1).sum(0) if patches == "patches" else fires.sum(0)
    )
    np.testing.assert_array_equal(got.n_images(), np.minimum(n_firing, 4))
    for latent in range(f.shape[-1]):
        kept = got.top_images[latent][got.top_images[latent] >= 0]
        assert len(set(kept.tolist())) == len(kept)


def test_thread_counts_follow_n_threads_and_do_not_change_the_result(tmp_path, monkeypatch):
    """An explicit count holds for every batch; auto (every usable CPU, then whatever the batches' timing picks)
    ranks the same images as the brute force, and torch's count is put back after either."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    store, acts = plant(tmp_path)
    sae, outside = make_sae(), torch.get_num_threads()
    for n_threads in (1, None):
        seen = []
        got = top_images.topk_pass(
            store,
            -2,
            "patches",
            sae,
            4,
            identity(store),
            imgs_per_batch=2,
            n_threads=n_threads,
            on_batch=lambda ids, rank, seen=seen: seen.append(torch.get_num_threads()),
        )
        assert len(seen) == 15 and (set(seen) == {1} if n_threads else seen[0] == 3 and set(seen) <= {1, 2, 3})
        assert torch.get_num_threads() == outside
        np.testing.assert_array_equal(got.top_images, brute_force(sae, acts, "patches", 4, True, np.arange(30))[1])


def test_store_without_cls_token_ranks_patches_and_has_nan_cls(tmp_path):
    store, acts = plant(tmp_path, cls_token=False)
    sae = make_sae("topk")
    got = top_images.topk_pass(store, -2, "patches", sae, 3, identity(store, k=3), imgs_per_batch=4)
    values, imgs, rows, _, _ = brute_force(sae, acts, "patches", 3, False, np.arange(30))
    np.testing.assert_array_equal(got.top_images, imgs)
    np.testing.assert_allclose(got.top_patches, rows, rtol=1e-5, atol=1e-6)
    assert np.isnan(got.top_cls).all()
    with pytest.raises(UserError, match="needs a CLS token"):
        top_images.topk_pass(store, -2, "cls", sae, 3, identity(store, "cls", 3))


def test_ties_go_to_the_lower_image_index():
    """Exact ties (planted: the encoder's float sums can differ by batch shape, so ties are built here directly)."""
    d_sae, k, n_patches = 3, 4, 2
    values = torch.tensor(
        [[2.0, 1.0, 0.0], [2.0, 1.0, 0.5], [2.0, 3.0, 0.0], [2.0, 1.0, 0.5], [2.0, 1.0, 0.0], [5.0, 1.0, 0.5]]
    )  # [images, d_sae]; latent 2 fires on three images only
    running = top_images._RunningTopK(d_sae, k, n_patches, "cpu")
    for batch in ([4, 5], [0, 2], [1, 3]):  # batches in any order: the result does not depend on it
        idx = torch.tensor(batch)
        patch_f = values[idx][:, None, :].expand(-1, n_patches, -1).contiguous()
        running.update(values[idx], patch_f, None, idx)
    got_values, got_images, rows, _ = running.result()
    assert got_images.tolist() == [[5, 0, 1, 2], [2, 0, 1, 3], [1, 3, 5, -1]]
    assert got_values[0].tolist() == [5.0, 2.0, 2.0, 2.0] and got_values[2, :3].tolist() == [0.5] * 3
    assert rows[1, 0].tolist() == [3.0, 3.0]


def test_cache_round_trip_and_refusal(tmp_path):
    store, _ = plant(tmp_path)
    ident = identity(store)
    got = top_images.topk_pass(store, -2, "patches", make_sae(), 4, ident)
    dump_to = str(tmp_path / "visuals")
    assert topk_cache.load_cache(dump_to, ident) is None
    topk_cache.save_cache(got, dump_to)
    back = topk_cache.load_cache(dump_to, ident)
    for name in ("top_values", "top_images", "top_patches", "top_cls", "freq", "mean_value", "hist"):
        np.testing.assert_array_equal(getattr(back, name), getattr(got, name))
    assert back.n_vectors == got.n_vectors
    other_sae = top_images.CacheIdentity("other-hash", ident.store_key, -2, "patches", 4)
    with pytest.raises(UserError, match="sae_sha256"):
        topk_cache.load_cache(dump_to, other_sae)
    other_store = top_images.CacheIdentity("sae-hash", "0123456789abcdef", -2, "patches", 4)
    with pytest.raises(UserError, match="store_key"):
        topk_cache.load_cache(dump_to, other_store)


PEAK_SCRIPT = """
import resource, sys
import numpy as np
from saev_core import config, nn
from saev_core.visuals import top_images
from saev_core.store import write_store

n_imgs, n_tokens, d_vit = 50_000, 7, 8
rng = np.random.default_rng(0)
store = write_store(sys.argv[1], lambda s, e: rng.normal(size=(1, e - s, n_tokens, d_vit)).astype(np.float32),
                    shape=(n_imgs, n_tokens, d_vit), imgs_per_shard=4096, fingerprint="big")
sae = nn.make_sae(config.SparseAutoencoderConfig(d_vit=d_vit, exp_factor=320, arch="topk", k=4))
identity = top_images.CacheIdentity("x", store.metadata.key, -2, "patches", 8)
top_images.topk_pass(store, -2, "patches", sae, 8, identity, imgs_per_batch=256)  # warm-up: one-time allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cache = top_images.topk_pass(store, -2, "patches", sae, 8, identity, imgs_per_batch=512)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, n_imgs * n_tokens * sae.cfg.d_sae * 4, cache.n_vectors)
"""


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """The pass holds O(d_sae * k * n_patches) plus one batch. An O(n_imgs) design (every image's latents) needs
    n_imgs * n_tokens * d_sae * 4 bytes = 3.6 GB here; the pass's peak growth must stay 10x below that."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    growth, o_n_imgs, n_vectors = map(int, out.stdout.split())
    assert n_vectors == 50_000 * 6
    assert growth < o_n_imgs / 10, (growth, o_n_imgs)
