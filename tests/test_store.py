"""The activation store on its own: planted data written with create/write_block, read back with zarr alone."""

import numpy as np
import pytest
import zarr

from saev_core.errors import UserError
from saev_core.store import ActivationStore, plan_layout, store_key


def planted_metadata(**changes) -> dict:
    meta = {
        "vit_family": "clip",
        "vit_ckpt": "planted/none",
        "d_vit": 8,
        "layers": [-2, -1],
        "resolved_layers": [2, 3],
        "n_patches_per_img": 4,
        "cls_token": True,
        "n_imgs": 10,
        "n_patches_per_shard": 2 * 5 * 4,  # 4 images per shard
        "data": {"kind": "planted"},
        "seed": 0,
        "dtype": "float32",
        "fingerprints": {"vit_ckpt": "a", "images": "b"},
    }
    meta.update(changes)
    return meta


def plant(root: str, **changes) -> tuple[ActivationStore, np.ndarray]:
    meta = planted_metadata(**changes)
    n = meta["n_imgs"]
    paths = [f"class{i % 2}/img{i:02d}.png" for i in range(n)]
    store = ActivationStore.create(root, meta, paths, [i % 2 for i in range(n)], ["class0", "class1"])
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, n, 5, 8)).astype(np.float32)
    for block in store.missing_blocks():
        start, end = store.layout.block_range(block)
        store.write_block(block, acts[:, start:end])
    return store, acts


def test_layout_follows_saev_shard_rule():
    layout = plan_layout(n_imgs=100, n_tokens=50, d_vit=768, n_layers=2, n_patches_per_shard=6400, itemsize=4)
    assert layout.imgs_per_shard == 64  # 6400 // (2 * 50)
    assert layout.imgs_per_shard % layout.imgs_per_chunk == 0
    assert layout.imgs_per_chunk * 50 * 768 * 4 <= 4 * 1024 * 1024
    assert layout.n_blocks == 2 and layout.block_range(1) == (64, 100)


def test_planted_store_reads_back_with_plain_zarr(tmp_path):
    store, acts = plant(str(tmp_path))
    group = zarr.open_group(store.path, mode="r")
    assert group.attrs["format_version"] == 1
    np.testing.assert_array_equal(group["layer_-2"][:], acts[0])
    np.testing.assert_array_equal(group["layer_-1"][:], acts[1])
    assert group["layer_-2"].shards == (4, 5, 8)
    assert group["progress"][:].tolist() == [1, 1, 1]
    assert list(group["image_index/path"][:])[:2] == ["class0/img00.png", "class1/img01.png"]


def test_metadata_fields_and_layer_lookup(tmp_path):
    store, acts = plant(str(tmp_path))
    reopened = ActivationStore.open(store.path)
    for field in ["vit_family", "vit_ckpt", "layers", "n_patches_per_img", "cls_token", "d_vit", "seed", "n_imgs",
                  "n_patches_per_shard", "data", "format_version", "fingerprints", "dtype"]:
        assert field in reopened.metadata, field
    assert reopened.layers == [-2, -1] and reopened.n_imgs == 10
    np.testing.assert_array_equal(reopened.array(-2)[:], acts[0])
    np.testing.assert_array_equal(reopened.array(2)[:], acts[0])  # resolved index of -2
    assert reopened.is_complete


def test_missing_layer_is_a_clear_error(tmp_path):
    store, _ = plant(str(tmp_path))
    with pytest.raises(UserError, match=r"Layer 5 is not in the store.*\[-2, -1\].*--vit-layers 5"):
        store.array(5)


def test_key_changes_with_any_fingerprint_or_metadata():
    base = store_key(planted_metadata())
    assert store_key(planted_metadata(fingerprints={"vit_ckpt": "a2", "images": "b"})) != base
    assert store_key(planted_metadata(fingerprints={"vit_ckpt": "a", "images": "b2"})) != base
    assert store_key(planted_metadata(layers=[-2])) != base
    assert store_key(planted_metadata(dtype="float16")) != base
    assert store_key(planted_metadata(resolved_layers=[9, 9])) == base  # derived, not part of the key


def test_memory_url_round_trip():
    store, acts = plant("memory://saev-test-roundtrip")
    assert store.path.startswith("memory://")
    reopened = ActivationStore.open(store.path)
    np.testing.assert_array_equal(reopened.array(-1)[3:7], acts[1, 3:7])
    assert reopened.image_paths()[9] == "class1/img09.png"


def test_only_blocks_marked_in_progress_count_and_resume_writes_the_rest(tmp_path):
    meta = planted_metadata()
    paths = [f"img{i}.png" for i in range(10)]
    store = ActivationStore.create(str(tmp_path), meta, paths, [0] * 10, [""])
    data = np.ones((2, 4, 5, 8), np.float32)
    store.write_block(1, data)
    assert store.missing_blocks() == [0, 2]
    again = ActivationStore.create(str(tmp_path), meta, paths, [0] * 10, [""])
    assert again.path == store.path and again.missing_blocks() == [0, 2]


def test_reopening_with_a_different_image_index_is_an_error(tmp_path):
    meta = planted_metadata()
    ActivationStore.create(str(tmp_path), meta, [f"img{i}.png" for i in range(10)], [0] * 10, [""])
    other = [f"img{i}.png" for i in range(9)] + ["zzz.png"]
    with pytest.raises(UserError, match="different image list.*index 9"):
        ActivationStore.create(str(tmp_path), meta, other, [0] * 10, [""])


def test_nan_block_is_refused_and_not_marked(tmp_path):
    meta = planted_metadata()
    store = ActivationStore.create(str(tmp_path), meta, [f"i{i}" for i in range(10)], [0] * 10, [""])
    bad = np.zeros((2, 4, 5, 8), np.float32)
    bad[1, 2, 3, 4] = np.nan
    with pytest.raises(UserError, match="NaN"):
        store.write_block(0, bad)
    assert store.missing_blocks() == [0, 1, 2]


def test_dump_to_that_is_a_file_is_an_error(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        ActivationStore.create(str(target), planted_metadata(), [f"i{i}" for i in range(10)], [0] * 10, [""])


def test_open_of_a_missing_store_names_the_path(tmp_path):
    with pytest.raises(UserError, match="No activation store at .*nowhere"):
        ActivationStore.open(str(tmp_path / "nowhere"))


def test_stats_round_trip(tmp_path):
    store, _ = plant(str(tmp_path))
    assert store.read_stats(-2, "patches") is None
    mean = np.arange(8, dtype=np.float64)
    store.write_stats(-2, "patches", mean, 0.5, n_vectors=40)
    got_mean, got_scale = ActivationStore.open(store.path).read_stats(10 - 8, "patches")
    np.testing.assert_array_equal(got_mean, mean)
    assert got_scale == 0.5
