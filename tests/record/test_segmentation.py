"""Segmentation sources: masks to patch labels (against hand-computed cases and a plain re-count), recording a
seg folder into a labelled store, fingerprints, and the embedded segmentation set."""

import collections
import os

import numpy as np
import pytest
from PIL import Image

from saev_core import config
from saev_core.__main__ import main
from saev_core.errors import UserError
from saev_core.record import embedded_seg as seg_set
from saev_core.record import images, segmentation
from saev_core.record import vit as vitlib
from saev_core.store import ActivationStore
from tests.helpers import activations_argv


def tiny_transform():
    """The tiny open_clip config's eval transform: shortest side to 224 (bicubic), centre crop 224; 7x7 patches of
    32 px. Building it needs no weights."""
    return vitlib.make_img_transform("clip", "saev-tiny-clip/none.pt")


def reference_majority(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The documented rule, one patch at a time with a Counter: 0 when more than half the pixels are 0, else the
    most frequent non-zero class, the lowest on a tie."""
    rows, cols = grid
    ph, pw = mask.shape[0] // rows, mask.shape[1] // cols
    out = []
    for r in range(rows):
        for c in range(cols):
            counts = collections.Counter(mask[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw].ravel().tolist())
            zeros = counts.pop(0, 0)
            if 2 * zeros > ph * pw:
                out.append(0)
            else:
                best = max(counts.values())
                out.append(min(k for k, v in counts.items() if v == best))
    return np.array(out)


# ----------------------------------------------------------------------------------------------------------------
# Masks to patches
# ----------------------------------------------------------------------------------------------------------------


def test_mask_to_patches_through_resize_and_centre_crop_matches_a_hand_computed_case():
    # A 672 x 448 mask (W x H). Resize: shortest side 448 -> 224, so 336 x 224, nearest-neighbour: output x samples
    # source column floor((x + 0.5) * 2) = 2x + 1 (rows alike). Centre crop 224 of 336: left = (336 - 224) / 2 = 56.
    # So output column c is source column 2c + 113; patch column j (output 32j..32j+31) reads source columns
    # 113 + 64j .. 175 + 64j (odd ones), patch row i reads source rows 64i + 1 .. 64i + 63.
    mask = np.zeros((448, 672), np.uint8)
    mask[:, :113] = 7  # left of the crop: never seen
    mask[:, 561:] = 7  # right of the crop (113 + 2 * 224 = 561): never seen
    mask[:, 113:241] = 1  # patch columns 0 and 1 (source 113..240)
    mask[:, 241:273] = 3  # patch column 2: 16 output px of class 3 ...
    mask[:, 273:305] = 2  # ... and 16 of class 2: a tie, the lower class (2) wins
    mask[:, 305:339] = 0  # patch column 3: 17 output px unlabelled (more than half) ...
    mask[:, 339:369] = 4  # ... 15 of class 4: unlabelled
    mask[:, 369:401] = 0  # patch column 4: exactly half unlabelled (16 px) ...
    mask[:, 401:433] = 5  # ... and half class 5: class 5 (unlabelled needs more than half)
    mask[:, 433:561] = 6  # patch columns 5 and 6
    mask[385:, 433:561] = 8  # the last patch row (source rows 385..447) of columns 5 and 6
    expected = np.array([[1, 1, 2, 0, 5, 6, 6]] * 6 + [[1, 1, 2, 0, 5, 8, 8]])

    viewed = segmentation.mask_transform(tiny_transform())(Image.fromarray(mask))
    assert viewed.size == (224, 224)
    labels = segmentation.patch_majority(np.asarray(viewed), (7, 7))
    np.testing.assert_array_equal(labels.reshape(7, 7), expected)


def test_a_padded_crop_is_unlabelled_where_it_pads():
    import torchvision.transforms as T

    mask = np.full((4, 8), 3, np.uint8)  # 8 wide, 4 high; the crop of 8 x 8 pads 2 rows above and below
    viewed = segmentation.mask_transform(T.Compose([T.CenterCrop(8)]))(Image.fromarray(mask))
    labels = segmentation.patch_majority(np.asarray(viewed), (4, 4))  # patches of 2 x 2
    np.testing.assert_array_equal(labels.reshape(4, 4), [[0] * 4, [3] * 4, [3] * 4, [0] * 4])


@pytest.mark.parametrize("seed", range(6))
def test_majority_rule_equals_a_plain_recount_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    # few classes and many zeros, so ties and near-half patches are common
    mask = (rng.integers(0, 4, size=(24, 36)) * (rng.random((24, 36)) < 0.6)).astype(np.uint8)
    grid = (4, 6) if seed % 2 else (6, 3)
    np.testing.assert_array_equal(segmentation.patch_majority(mask, grid), reference_majority(mask, grid))


def test_a_non_square_patch_grid_is_refused():
    with pytest.raises(UserError, match="square patch grid"):
        segmentation.patch_grid(48)


# ----------------------------------------------------------------------------------------------------------------
# A seg folder, recorded
# ----------------------------------------------------------------------------------------------------------------


def write_seg_folder(root, classes: list[str] | None = ("sky", "road", "tree")) -> dict[str, np.ndarray]:
    """Four images with masks in ADE20K's layout; returns each image's expected 7x7 patch labels (hand-derived).

    224 x 224 images pass the tiny ViT's transform unchanged, so patch (r, c) is pixels 32r.., 32c...
    The 448 x 448 one is halved (nearest: source pixel 2x + 1), so its patch (r, c) is source 64r.., 64c..."""
    rng = np.random.default_rng(0)
    expected = {}

    def put(rel: str, mask: np.ndarray, labels: np.ndarray) -> None:
        h, w = mask.shape
        img = os.path.join(root, "images", rel + ".jpg")
        os.makedirs(os.path.dirname(img), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img)
        ann = os.path.join(root, "annotations", rel + ".png")
        os.makedirs(os.path.dirname(ann), exist_ok=True)
        Image.fromarray(mask).save(ann)
        expected[rel] = labels

    left_right = np.zeros((224, 224), np.uint8)
    left_right[:, :96], left_right[:, 96:] = 1, 2  # patch columns 0-2 sky, 3-6 road
    put("training/a", left_right, np.array([[1, 1, 1, 2, 2, 2, 2]] * 7))
    unlabelled = np.zeros((224, 224), np.uint8)
    unlabelled[:, 208:] = 3  # half of patch column 6 is tree: exactly half, so tree
    put("training/b", unlabelled, np.array([[0, 0, 0, 0, 0, 0, 3]] * 7))
    top_bottom = np.zeros((448, 448), np.uint8)
    top_bottom[:128], top_bottom[128:] = 3, 1  # source rows 0..127: patch rows 0 and 1
    put("validation/c", top_bottom, np.array([[3] * 7] * 2 + [[1] * 7] * 5))
    speckled = np.full((224, 224), 2, np.uint8)
    speckled[::2, ::2] = 0  # a quarter unlabelled: every patch road
    put("validation/d", speckled, np.full((7, 7), 2))
    if classes is not None:
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("".join(f"{c}\n" for c in classes))
    return expected


def record_seg(capsys, ckpt, root, dump_to, *extra, data_flags=(), status=0) -> str:
    """Record through the CLI; the store's path (the last line printed), or with ``status`` 2 the error line."""
    argv = activations_argv(
        ckpt,
        root,
        dump_to,
        "--vit-layers",
        "-1",
        "--device",
        "cpu",
        *extra,
        data_kind="seg-folder-dataset",
        data_flags=data_flags,
    )
    assert main(argv) == status
    out = capsys.readouterr()
    return (out.out if status == 0 else out.err).strip().splitlines()[-1]


def test_recording_a_seg_folder_stores_the_expected_patch_labels(capsys, tmp_path, tiny_clip_ckpt):
    expected = write_seg_folder(tmp_path / "seg")
    path = record_seg(capsys, tiny_clip_ckpt, tmp_path / "seg", tmp_path / "acts", "--n-patches-per-shard", "100")
    store = ActivationStore.open(path)
    assert store.layout.n_blocks == 2  # two images per block: labels are written block by block
    assert store.image_paths() == ["training/a.jpg", "training/b.jpg", "validation/c.jpg", "validation/d.jpg"]
    assert store.class_names == ["training", "validation"]  # image level: the first sub-folder under images/
    assert store.patch_class_names == ["unlabelled", "sky", "road", "tree"]
    labels = store.patch_labels()
    assert labels.shape == (4, 49) and labels.dtype == np.uint8
    for i, rel in enumerate(store.image_paths()):
        np.testing.assert_array_equal(labels[i].reshape(7, 7), expected[rel[:-4]], err_msg=rel)
    assert store.metadata["data"]["kind"] == "seg-folder-dataset"
    assert store.valid_images().all()


def test_a_resumed_recording_writes_the_missing_blocks_labels(capsys, tmp_path, tiny_clip_ckpt):
    write_seg_folder(tmp_path / "seg")
    args = (capsys, tiny_clip_ckpt, tmp_path / "seg", tmp_path / "acts", "--n-patches-per-shard", "100")
    path = record_seg(*args)
    full = ActivationStore.open(path).patch_labels()
    import zarr

    group = zarr.open_group(path, mode="r+")  # what a kill during block 1 leaves: no mark, no labels
    group["progress"][1] = 0
    group["patch_labels"][2:4] = 0
    assert record_seg(*args) == path
    np.testing.assert_array_equal(ActivationStore.open(path).patch_labels(), full)


def test_fan_out_parts_and_loading_workers_write_the_same_labels_as_one_run(capsys, tmp_path, tiny_clip_ckpt):
    from saev_core.record import recording

    expected = write_seg_folder(tmp_path / "seg")
    base = dict(
        vit_family="clip",
        vit_ckpt=tiny_clip_ckpt,
        vit_layers=(-1,),
        n_patches_per_shard=50,  # one image per block
        vit_batch_size=1,
        device="cpu",
        data=config.SegFolderDataset(root=str(tmp_path / "seg")),
    )
    cfg = config.ActivationsConfig(**base, n_workers=2, dump_to=str(tmp_path / "two"))  # labels made in workers
    path = recording.create_store(cfg)
    for i in (1, 0):
        recording.record_activations(cfg, show_progress=False, part=(i, 2))
    store = ActivationStore.open(path)
    assert store.is_complete
    for i, rel in enumerate(store.image_paths()):
        np.testing.assert_array_equal(store.patch_labels()[i].reshape(7, 7), expected[rel[:-4]], err_msg=rel)


def test_without_classes_txt_the_classes_are_numbered(capsys, tmp_path, tiny_clip_ckpt):
    write_seg_folder(tmp_path / "seg", classes=None)
    src = images.make_image_source(config.SegFolderDataset(root=str(tmp_path / "seg")))
    assert src.patch_class_names == ["unlabelled", *map(str, range(1, 256))]


def test_patch_labels_change_the_key_and_a_plain_folder_has_none(capsys, tmp_path, tiny_clip_ckpt):
    write_seg_folder(tmp_path / "seg")
    seg_path = record_seg(capsys, tiny_clip_ckpt, tmp_path / "seg", tmp_path / "acts")
    argv = ["activations", "--vit-family", "clip", "--vit-ckpt", tiny_clip_ckpt, "--vit-layers", "-1"]
    argv += ["--dump-to", str(tmp_path / "acts"), "--n-workers", "0", "--device", "cpu"]
    assert main([*argv, "data:image-folder-dataset", "--data.root", str(tmp_path / "seg" / "images")]) == 0
    plain_path = capsys.readouterr().out.strip().splitlines()[-1]
    seg, plain = ActivationStore.open(seg_path), ActivationStore.open(plain_path)
    assert seg.metadata.key != plain.metadata.key
    assert plain.patch_labels() is None and plain.patch_class_names == []
    assert "patch_labels" in seg.metadata.fingerprints and "patch_labels" not in plain.metadata.fingerprints
    np.testing.assert_array_equal(np.asarray(seg.array(-1)[:]), np.asarray(plain.array(-1)[:]))  # same pixels

    # another mask (touched), or other class names, give another store
    src = images.make_image_source(config.SegFolderDataset(root=str(tmp_path / "seg")))
    before = (src.patch_labels_fingerprint(), images.image_list_fingerprint(src))
    os.utime(src.mask_abspath(0), ns=(1, 1))
    touched = (src.patch_labels_fingerprint(), images.image_list_fingerprint(src))
    with open(tmp_path / "seg" / "classes.txt", "w") as f:
        f.write("sky\nroad\nforest\n")
    renamed = images.make_image_source(config.SegFolderDataset(root=str(tmp_path / "seg")))
    prints = [before, touched, (renamed.patch_labels_fingerprint(), images.image_list_fingerprint(renamed))]
    assert len({p[0] for p in prints}) == 3 and len({p[1] for p in prints}) == 3


def test_skip_bad_records_an_image_with_a_bad_mask_as_invalid(capsys, tmp_path, tiny_clip_ckpt):
    write_seg_folder(tmp_path / "seg")
    bad = tmp_path / "seg" / "annotations" / "training" / "b.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    line = record_seg(capsys, tiny_clip_ckpt, tmp_path / "seg", tmp_path / "acts", status=2)
    assert f"{bad} is 10x10 but its image {tmp_path}/seg/images/training/b.jpg is 224x224" in line
    path = record_seg(capsys, tiny_clip_ckpt, tmp_path / "seg", tmp_path / "acts", data_flags=["--data.skip-bad"])
    store = ActivationStore.open(path)
    assert store.valid_images().tolist() == [True, False, True, True]
    assert not store.patch_labels()[1].any() and not np.asarray(store.array(-1)[1]).any()
    assert store.patch_labels()[0].any()


# ----------------------------------------------------------------------------------------------------------------
# The embedded segmentation set
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_seg(tmp_path_factory):
    cfg = config.EmbeddedSegDataset(cache_dir=str(tmp_path_factory.mktemp("embedded_seg")), n_imgs=24)
    return cfg, seg_set.ensure_embedded_seg_images(cfg)


def _files(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def test_embedded_seg_set_is_deterministic(embedded_seg, tmp_path):
    cfg, folder = embedded_seg
    again = seg_set.ensure_embedded_seg_images(config.EmbeddedSegDataset(cache_dir=str(tmp_path), n_imgs=24))
    assert _files(again) == _files(folder) and len(_files(folder)) == 2 * 24 + 1
    for rel in _files(folder):
        with open(os.path.join(folder, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    with open(os.path.join(folder, "classes.txt")) as f:
        assert f.read().split() == ["brick", "grass", "gravel", "coins", "tissue", "stars"]


def test_embedded_seg_masks_are_exact(embedded_seg):
    """Each mask equals the plan's regions drawn here with numpy, and each pixel of class k is texture k's pixel
    (class 0: the background's): the mask says exactly where every pixel came from."""
    cfg, folder = embedded_seg
    src = images.make_image_source(cfg)
    loaded = dict(seg_set.load_photos([p for _, p in seg_set.SEG_CLASSES] + list(seg_set.SEG_BACKGROUNDS)))
    textures = [loaded[p] for _, p in seg_set.SEG_CLASSES]
    backgrounds = [loaded[p] for p in seg_set.SEG_BACKGROUNDS]
    seen = set()
    for i in range(len(src)):
        n = int(os.path.splitext(os.path.basename(src.paths[i]))[0])
        plan = seg_set.composite_plan(n)
        img = np.asarray(Image.open(src.abspath(i)))
        mask = np.asarray(Image.open(src.mask_abspath(i)))
        expected = np.zeros((224, 224), np.uint8)
        sources = [seg_set.square_crop(backgrounds[plan.background], plan.crop, 224, 224)]
        if plan.flip:
            sources[0] = sources[0][:, ::-1]
        for p in plan.pastes:
            yy, xx = np.mgrid[0 : p.height, 0 : p.width]
            inside = (
                ((yy + 0.5) / p.height * 2 - 1) ** 2 + ((xx + 0.5) / p.width * 2 - 1) ** 2 <= 1
                if p.ellipse
                else np.ones_like(yy, bool)
            )
            expected[p.top : p.top + p.height, p.left : p.left + p.width][inside] = p.k
            full = np.zeros((224, 224, 3), np.uint8)
            full[p.top : p.top + p.height, p.left : p.left + p.width] = seg_set.square_crop(
                textures[p.k - 1], p.crop, p.width, p.height
            )
            sources.append((p.k, full))
        np.testing.assert_array_equal(mask, expected, err_msg=src.paths[i])
        np.testing.assert_array_equal(img[mask == 0], sources[0][mask == 0])
        for k, full in sources[1:]:
            np.testing.assert_array_equal(img[mask == k], full[mask == k])
        assert (
            src.paths[i].split("/")[0] == seg_set.SEG_CLASSES[np.argmax(np.bincount(mask.ravel(), minlength=7)[1:])][0]
        )
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(7))  # every class and the background occur


def test_recording_the_embedded_seg_set_labels_each_patch_by_its_mask_majority(
    capsys, embedded_seg, tmp_path, tiny_clip_ckpt
):
    cfg, _ = embedded_seg
    argv = ["activations", "--vit-family", "clip", "--vit-ckpt", tiny_clip_ckpt, "--vit-layers", "-1", "--n-imgs", "8"]
    argv += ["--dump-to", str(tmp_path / "acts"), "--n-workers", "0", "--device", "cpu"]
    assert main([*argv, "data:embedded-seg-dataset", "--data.cache-dir", cfg.cache_dir, "--data.n-imgs", "24"]) == 0
    store = ActivationStore.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert store.patch_class_names == ["unlabelled", "brick", "grass", "gravel", "coins", "tissue", "stars"]
    src = images.make_image_source(cfg, n_imgs=8)
    for i in range(8):  # 224 x 224 composites pass the tiny ViT's transform unchanged
        mask = np.asarray(Image.open(src.mask_abspath(i)))
        np.testing.assert_array_equal(store.patch_labels()[i], reference_majority(mask, (7, 7)))
    assert store.metadata["data"] == {"kind": "embedded-seg-dataset", "n_imgs": 24}
