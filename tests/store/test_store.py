"""The activation store on its own: planted data written with create/write_block, read back with zarr alone."""

import os
import pathlib
import shutil

import numpy as np
import pytest
import zarr

from saev_core.errors import UserError
from saev_core.store import ActivationStore, arrays_metadata, shards, write_store
from saev_core.store import metadata as store_metadata
from saev_core.store.metadata import StoreMetadata, plan_layout
from saev_core.store.shards import ChunkReader


def planted_metadata(**changes) -> StoreMetadata:
    """Two layers of 10 images x 5 tokens (CLS + 4 patches) x 8, 4 images per shard."""
    kw = {"layers": (-2, -1), "imgs_per_shard": 4, "fingerprint": "b", **changes}
    if "layers" not in changes:
        kw["resolved_layers"] = (2, 3)
    return arrays_metadata(10, 5, 8, **kw)


def plant(root: str, **changes) -> tuple[ActivationStore, np.ndarray]:
    acts = np.random.default_rng(0).normal(size=(2, 10, 5, 8)).astype(np.float32)
    store = write_store(
        root,
        acts,
        (-2, -1),
        imgs_per_shard=4,
        image_paths=[f"class{i % 2}/img{i:02d}.png" for i in range(10)],
        labels=[i % 2 for i in range(10)],
        class_names=["class0", "class1"],
        resolved_layers=(2, 3),
        fingerprint="b",
        **changes,
    )
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
    for field in [
        "vit_family",
        "vit_ckpt",
        "layers",
        "n_patches_per_img",
        "cls_token",
        "d_vit",
        "seed",
        "n_imgs",
        "n_patches_per_shard",
        "data",
        "format_version",
        "fingerprints",
        "dtype",
    ]:
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
    base = planted_metadata().key
    assert planted_metadata(fingerprints={"vit_ckpt": "a2", "images": "b"}).key != base
    assert planted_metadata(fingerprints={"vit_ckpt": "a", "images": "b2"}).key != base
    assert planted_metadata(layers=[-2]).key != base
    assert planted_metadata(dtype="float16").key != base
    assert planted_metadata(resolved_layers=[9, 9]).key == base  # derived, not part of the key


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
    got_mean, got_scale = ActivationStore.open(store.path).read_stats(2, "patches")  # 2: -2's resolved index
    np.testing.assert_array_equal(got_mean, mean)
    assert got_scale == 0.5


# -- the direct shard writer ---------------------------------------------------------------------------------------


def tree(root) -> dict[str, bytes]:
    """Every file under root: relative path -> bytes."""
    root = pathlib.Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_two_chunk_store(root: str, acts: np.ndarray, monkeypatch) -> ActivationStore:
    """A store of 10 images in shards of 4 and inner chunks of 2 (blocks 0, 1 whole, block 2 of 2 images)."""
    dtype = np.dtype(acts.dtype)
    monkeypatch.setattr(store_metadata, "CHUNK_TARGET_BYTES", 2 * 5 * 8 * dtype.itemsize)
    store = ActivationStore.create(
        root, planted_metadata(dtype=dtype.name), [f"i{i}" for i in range(10)], [0] * 10, [""]
    )
    assert (store.layout.imgs_per_chunk, store.layout.imgs_per_shard) == (2, 4)
    for block in range(store.layout.n_blocks):
        start, end = store.layout.block_range(block)
        store.write_block(block, acts[:, start:end])
    return store


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_direct_shard_writes_are_byte_identical_to_zarr_and_read_back_with_plain_zarr(tmp_path, monkeypatch, dtype):
    acts = np.random.default_rng(1).normal(size=(2, 10, 5, 8)).astype(dtype)
    acts[0, 0:2] = 0  # an inner chunk of fill values: zarr leaves it out of the shard
    acts[0, 6:8] = -0.0  # not the fill value bit for bit: zarr stores it
    acts[1, 4:8] = 0  # a whole shard of fill values: zarr stores no file
    direct_calls = []
    original = shards.PlainShardLayout.write_shard
    monkeypatch.setattr(
        shards.PlainShardLayout,
        "write_shard",
        lambda self, shard, data: (direct_calls.append(shard), original(self, shard, data)),
    )
    direct = write_two_chunk_store(str(tmp_path / "direct"), acts, monkeypatch)
    assert sorted(direct_calls) == [0, 0, 1, 1]  # whole blocks of both layers; the partial last one went to zarr

    monkeypatch.setattr(shards.PlainShardLayout, "of", classmethod(lambda cls, arr: None))
    through_zarr = write_two_chunk_store(str(tmp_path / "zarr"), acts, monkeypatch)
    assert direct.path.endswith(through_zarr.path.split("/")[-1])

    got, want = tree(direct.path), tree(through_zarr.path)
    assert "layer_-2/c/0/0/0" in got and "layer_-1/c/1/0/0" not in got
    assert got.keys() == want.keys()  # no temporary file left behind either
    for name in want:
        assert got[name] == want[name], name
    group = zarr.open_group(direct.path, mode="r")
    np.testing.assert_array_equal(group["layer_-2"][:], acts[0])
    np.testing.assert_array_equal(group["layer_-1"][:], acts[1])
    assert np.signbit(group["layer_-2"][6:8]).all()
    assert group["progress"][:].tolist() == [1, 1, 1]


def test_a_wrong_shard_index_checksum_is_caught_by_zarr_and_the_reader(tmp_path, monkeypatch):
    acts = np.random.default_rng(2).normal(size=(2, 10, 5, 8)).astype(np.float32)
    store = write_two_chunk_store(str(tmp_path), acts, monkeypatch)
    shard = pathlib.Path(store.path) / "layer_-2" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-36] ^= 1  # the first chunk's offset (0 -> 1): readable, but the index's crc32c no longer matches
    shard.write_bytes(bytes(raw))
    arr = zarr.open_group(store.path, mode="r")["layer_-2"]
    with pytest.raises(ValueError, match="checksum"):
        arr[4:8]
    with pytest.raises(ValueError, match="checksum"):
        ChunkReader(arr).read(4, np.empty((2, 5, 8), np.float32))  # the raw path declines; zarr raises
    np.testing.assert_array_equal(arr[0:4], acts[0, 0:4])  # other shards are untouched


def test_a_shard_write_that_fails_midway_leaves_the_old_shard_and_no_mark(tmp_path, monkeypatch):
    acts = np.random.default_rng(3).normal(size=(2, 10, 5, 8)).astype(np.float32)
    store = write_two_chunk_store(str(tmp_path), acts, monkeypatch)
    store.group["progress"][1] = 0
    before = tree(store.path)

    def write_half_then_die(fd, pieces):
        os.write(fd, bytes(pieces[0][:100]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "_write_all", write_half_then_die)
    with pytest.raises(UserError, match=f"Cannot write {store.path} \\(block 1\\): the disk is full"):
        store.write_block(1, acts[:, 4:8] + 1)
    assert tree(store.path) == before  # the old shard whole, no *.partial file
    assert store.missing_blocks() == [1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_non_finite_value_is_refused_but_huge_finite_values_pass(tmp_path, bad):
    meta = planted_metadata()
    store = ActivationStore.create(str(tmp_path), meta, [f"i{i}" for i in range(10)], [0] * 10, [""])
    huge = np.full((2, 4, 5, 8), 3e38, np.float32)  # its sum of squares overflows: must not be taken for Inf
    store.write_block(0, huge)
    np.testing.assert_array_equal(store.array(-2)[0:4], huge[0])
    block = huge.copy()
    block[0, 3, 4, 7] = bad
    with pytest.raises(UserError, match="NaN or Inf"):
        store.write_block(1, block)
    assert store.missing_blocks() == [1, 2]


def test_statistics_written_by_parts_finishing_together_are_whole(tmp_path):
    """Fan-out parts that finish at once all write the statistics (the same numbers); none may fail or leave them
    half-written (zarr's look-then-create raced, and overwriting deleted the other writer's array)."""
    import threading

    store = write_store(
        str(tmp_path / "s"),
        lambda s, e: np.ones((1, e - s, 3, 4), np.float32),
        shape=(8, 3, 4),
        imgs_per_shard=4,
        fingerprint="x",
    )
    errors = []

    def write():
        try:
            ActivationStore.open(store.path, mode="r+").write_stats(-2, "patches", np.arange(4.0), 2.0, 8)
        except Exception as err:  # noqa: BLE001 (any failure of a writer is what this test looks for)
            errors.append(repr(err))

    for _ in range(20):
        shutil.rmtree(os.path.join(store.path, "stats", "layer_-2"), ignore_errors=True)
        writers = [threading.Thread(target=write) for _ in range(4)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        mean, scale = ActivationStore.open(store.path).read_stats(-2, "patches")
        assert scale == 2.0 and np.array_equal(mean, np.arange(4.0))
    assert errors == []


# ----------------------------------------------------------------------------------------------------------------
# Per-patch labels
# ----------------------------------------------------------------------------------------------------------------


def planted_patch_labels() -> np.ndarray:
    """[10 images, 4 patches] in 0..3, every class present."""
    return (np.arange(40).reshape(10, 4) * 7 % 4).astype(np.int64)


def test_patch_labels_round_trip_and_read_back_with_plain_zarr(tmp_path):
    labels = planted_patch_labels()
    names = ["unlabelled", "sky", "road", "tree"]
    store, _ = plant(str(tmp_path), patch_labels=labels, patch_class_names=names)
    reopened = ActivationStore.open(store.path)
    np.testing.assert_array_equal(reopened.patch_labels(), labels)
    assert reopened.patch_labels().dtype == np.uint8
    assert reopened.patch_class_names == names
    assert reopened.class_names == ["class0", "class1"]  # the image-level classes are kept beside them
    group = zarr.open_group(store.path, mode="r")
    np.testing.assert_array_equal(group["patch_labels"][:], labels)
    assert group["patch_labels"].attrs["class_names"] == names
    assert group["patch_labels"].chunks == (4, 4)  # one chunk per block: written with it


def test_a_store_without_patch_labels_says_so(tmp_path):
    store, _ = plant(str(tmp_path))
    assert store.patch_labels() is None and store.patch_class_names == []


def test_patch_labels_change_the_store_key(tmp_path):
    plain, _ = plant(str(tmp_path))
    labelled, _ = plant(str(tmp_path), patch_labels=planted_patch_labels())
    other = planted_patch_labels()
    other[0, 0] = (other[0, 0] + 1) % 4
    relabelled, _ = plant(str(tmp_path), patch_labels=other)
    renamed, _ = plant(str(tmp_path), patch_labels=planted_patch_labels(), patch_class_names=list("uabc"))
    keys = {s.metadata.key for s in (plain, labelled, relabelled, renamed)}
    assert len(keys) == 4
    assert "patch_labels" not in plain.metadata.fingerprints
    assert labelled.patch_class_names == ["unlabelled", "1", "2", "3"]


def test_blocks_of_a_labelled_store_need_their_labels(tmp_path):
    meta = planted_metadata(patch_labels_fingerprint="p")
    store = ActivationStore.create(
        str(tmp_path), meta, [f"{i}.png" for i in range(10)], [0] * 10, [""], patch_class_names=["u", "a"]
    )
    acts = np.zeros((2, 4, 5, 8), np.float32)
    with pytest.raises(ValueError, match="patch labels of shape"):
        store.write_block(0, acts)
    with pytest.raises(ValueError, match="outside 0..1"):
        store.write_block(0, acts, patch_labels=np.full((4, 4), 2))
    assert store.missing_blocks() == [0, 1, 2]
    store.write_block(0, acts, patch_labels=np.ones((4, 4), int))
    assert store.missing_blocks() == [1, 2] and store.patch_labels()[:4].tolist() == [[1] * 4] * 4
    with pytest.raises(ValueError, match="fingerprints name its patch labels"):
        ActivationStore.create(
            str(tmp_path), planted_metadata(), ["x"] * 10, [0] * 10, [""], patch_class_names=["u", "a"]
        )
    plain = ActivationStore.create(str(tmp_path), planted_metadata(), [f"{i}.png" for i in range(10)], [0] * 10, [""])
    with pytest.raises(ValueError, match="has no patch labels"):
        plain.write_block(0, acts, patch_labels=np.ones((4, 4), int))


def test_more_than_255_patch_classes_are_int16(tmp_path):
    labels = planted_patch_labels() * 100  # up to 300
    store, _ = plant(str(tmp_path), patch_labels=labels)
    assert store.patch_labels().dtype == np.int16 and len(store.patch_class_names) == 301
    np.testing.assert_array_equal(store.patch_labels(), labels)
