"""Image sources: listing order, classes, decoding of every mode, bad files, fingerprints, the embedded set."""

import io
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from saev_core import config
from saev_core.errors import UserError
from saev_core.record import embedded as embedded_set
from saev_core.record import images

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "embedded-images.md")


def _write(path, img: Image.Image | None = None, data: bytes | None = None, **save_kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if data is not None:
        with open(path, "wb") as f:
            f.write(data)
    else:
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".tif": "TIFF"}
        img.save(path, format=fmt[os.path.splitext(path)[1].lower()], **save_kw)


def _small(color=(10, 20, 30)) -> Image.Image:
    return Image.new("RGB", (8, 6), color)


def _to_tensor_32(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.resize((32, 32)))).permute(2, 0, 1).float()


def _folder(root: str, cfg_root: str | None = None) -> config.ImageFolderDataset:
    return config.ImageFolderDataset(root=cfg_root or root)


# ----------------------------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = str(tmp_path / "imgs")
    for rel in ["b/x.JPG", "a/sub/y.Png", "a/z.jpeg", "top.png", "B/u.gif", "a/sub/deeper/w.png"]:
        _write(os.path.join(root, *rel.split("/")), _small())
    # ignored silently: dotfiles and anything in dot-folders
    for rel in [".hidden.png", ".cache/a.png", "a/.x.png", "a/.thumbs/t.jpg"]:
        _write(os.path.join(root, *rel.split("/")), _small())
    _write(os.path.join(root, "notes.txt"), data=b"not an image")
    _write(os.path.join(root, "a", "labels.csv"), data=b"a,b")
    return root


def test_index_order_is_sorted_posix_relative_paths_and_class_is_first_subfolder(tree):
    with pytest.warns(images.IgnoredFilesWarning):
        src = images.make_image_source(_folder(tree))
    expected = sorted(["b/x.JPG", "a/sub/y.Png", "a/z.jpeg", "top.png", "B/u.gif", "a/sub/deeper/w.png"])
    assert expected[0] == "B/u.gif"  # sorted() puts upper case first; the reference is Python's own order
    assert src.paths == expected
    assert src.class_names == ["", "B", "a", "b"]
    classes = [p.split("/")[0] if "/" in p else "" for p in expected]
    assert [src.class_names[label] for label in src.labels] == classes
    assert src.root == os.path.abspath(tree)
    assert src.abspath(1) == os.path.join(os.path.abspath(tree), "a", "sub", "deeper", "w.png")
    assert len(src) == 6
    for i in range(len(src)):
        pixels, index, label = src[i]
        assert index == i and label == src.labels[i]
        assert pixels.mode == "RGB" and pixels.size == (8, 6)


def test_non_image_files_are_named_in_one_warning(tree):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images.make_image_source(_folder(tree))
    ours = [w for w in caught if issubclass(w.category, images.IgnoredFilesWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "notes.txt" in msg and "a/labels.csv" in msg and "2 file(s)" in msg
    assert ".hidden" not in msg and ".cache" not in msg


def test_many_non_image_files_are_listed_as_first_ten_and_a_count(tmp_path):
    root = str(tmp_path)
    _write(os.path.join(root, "img.png"), _small())
    for k in range(15):
        _write(os.path.join(root, f"note{k:02d}.txt"), data=b"x")
    with pytest.warns(images.IgnoredFilesWarning, match=r"15 file\(s\).*note09\.txt and 5 more") as rec:
        images.make_image_source(_folder(root))
    assert "note10.txt" not in str(rec[0].message)


def test_n_imgs_takes_the_first_n_of_the_sorted_order_and_keeps_labels(tree):
    with pytest.warns(images.IgnoredFilesWarning):
        full = images.make_image_source(_folder(tree))
    with pytest.warns(images.IgnoredFilesWarning):
        capped = images.make_image_source(_folder(tree), n_imgs=3)
    assert capped.paths == full.paths[:3]
    assert capped.labels == full.labels[:3]
    assert capped.class_names == full.class_names
    with pytest.raises(UserError, match="n_imgs"):
        images.make_image_source(_folder(tree), n_imgs=0)


def test_empty_folder_is_a_user_error_naming_the_folder(tmp_path):
    root = tmp_path / "empty_dir"
    root.mkdir()
    (root / ".DS_Store").write_bytes(b"x")
    with pytest.raises(UserError, match=re.escape(str(root))) as err:
        images.make_image_source(_folder(str(root)))
    assert "No images found" in str(err.value)


def test_folder_with_only_non_images_is_a_user_error(tmp_path):
    (tmp_path / "readme.md").write_text("hi")
    with pytest.warns(images.IgnoredFilesWarning), pytest.raises(UserError, match="1 other file"):
        images.make_image_source(_folder(str(tmp_path)))


def test_missing_folder_or_a_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=re.escape(str(missing)) + ".*does not exist"):
        images.make_image_source(_folder(str(missing)))
    a_file = tmp_path / "f.png"
    _small().save(a_file)
    with pytest.raises(UserError, match="not a folder"):
        images.make_image_source(_folder(str(a_file)))


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def _px(img: Image.Image, x: int, y: int = 0) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(img)[y, x])


def test_gray_cmyk_and_palette_become_rgb(tmp_path):
    gray = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    _write(str(tmp_path / "gray.png"), gray)
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((1, 0), (0, 255, 255, 0))  # magenta + yellow: red
    _write(str(tmp_path / "cmyk.tif"), cmyk)
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    _write(str(tmp_path / "pal.png"), pal)

    out = images.load_rgb(tmp_path / "gray.png")
    assert out.mode == "RGB" and [_px(out, x) for x in range(3)] == [(0, 0, 0), (77, 77, 77), (255, 255, 255)]
    out = images.load_rgb(tmp_path / "cmyk.tif")
    assert Image.open(tmp_path / "cmyk.tif").mode == "CMYK"
    assert out.mode == "RGB" and [_px(out, x) for x in range(2)] == [(255, 255, 255), (255, 0, 0)]
    out = images.load_rgb(tmp_path / "pal.png")
    assert out.mode == "RGB" and [_px(out, x) for x in range(2)] == [(255, 0, 0), (0, 0, 255)]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (200, 10, 10, 255))  # opaque: unchanged
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # transparent black: white, not black
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white: 255 * (1 - 128/255) = 127
    _write(str(tmp_path / "rgba.png"), rgba)
    la = Image.new("LA", (1, 1), (0, 0))
    _write(str(tmp_path / "la.png"), la)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    _write(str(tmp_path / "pal_t.png"), pal, transparency=0)  # palette entry 0 is transparent

    out = images.load_rgb(tmp_path / "rgba.png")
    assert _px(out, 0) == (200, 10, 10) and _px(out, 1) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in _px(out, 2))
    assert _px(images.load_rgb(tmp_path / "la.png"), 0) == (255, 255, 255)
    out = images.load_rgb(tmp_path / "pal_t.png")
    assert _px(out, 0) == (255, 255, 255) and _px(out, 1) == (0, 255, 0)


def test_16_bit_gray_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 257 * 10, 32896, 65535]], dtype=np.uint16)
    _write(str(tmp_path / "g16.png"), Image.fromarray(values))
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # the precondition of this test
    out = images.load_rgb(tmp_path / "g16.png")
    # v * 255 / 65535: 2570 -> 10, 32896 -> 128 (a clipping decoder gives 255 for both)
    assert out.mode == "RGB" and [_px(out, x) for x in range(4)] == [(v, v, v) for v in (0, 10, 128, 255)]


def test_32_bit_integer_image_holding_16_bit_values_is_scaled(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.int32)
    _write(str(tmp_path / "i32.tif"), Image.fromarray(values, mode="I"))
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    out = images.load_rgb(tmp_path / "i32.tif")
    assert [_px(out, x)[0] for x in range(3)] == [0, 128, 255]


@pytest.fixture
def with_bad_files(tmp_path):
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=95)
    full = buf.getvalue()
    _write(os.path.join(root, "a_good.jpg"), data=full)
    _write(os.path.join(root, "b_truncated.jpg"), data=full[: len(full) // 2])
    _write(os.path.join(root, "c_garbage.png"), data=b"this is not a png at all" * 10)
    return root


def test_undecodable_files_give_black_pixels_and_bad_label_and_a_reason(with_bad_files):
    src = images.make_image_source(_folder(with_bad_files), transform=_to_tensor_32)
    assert src.paths == ["a_good.jpg", "b_truncated.jpg", "c_garbage.png"]
    good, _, good_label = src[0]
    assert good_label == src.labels[0] == 0 and good.shape == (3, 32, 32) and good.abs().sum() > 0
    for i in (1, 2):
        pixels, index, label = src[i]
        assert index == i and label == images.BAD_IMAGE == -1
        assert pixels.shape == good.shape and torch.count_nonzero(pixels) == 0
    assert src.decode_error(0) == ""
    reason = src.decode_error(1)
    assert src.abspath(1) in reason and "truncated" in reason.lower()
    reason = src.decode_error(2)
    assert src.abspath(2) in reason and "UnidentifiedImageError" in reason


def test_bad_file_without_transform_gives_black_224_image(with_bad_files):
    src = images.make_image_source(_folder(with_bad_files))
    pixels, _, label = src[2]
    assert label == -1 and pixels.mode == "RGB" and pixels.size == (224, 224) and not np.asarray(pixels).any()


def test_dataloader_batches_a_source_with_a_bad_file(with_bad_files):
    src = images.make_image_source(_folder(with_bad_files), transform=_to_tensor_32)
    pixels, index, label = next(iter(torch.utils.data.DataLoader(src, batch_size=3, num_workers=0)))
    assert pixels.shape == (3, 3, 32, 32)
    assert index.tolist() == [0, 1, 2] and label.tolist() == [0, -1, -1]


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------------------------


def test_fingerprint_changes_on_touch_add_and_rename_only(tmp_path):
    root = str(tmp_path)
    for rel in ["c1/a.png", "c1/b.png", "c2/c.png"]:
        _write(os.path.join(root, *rel.split("/")), _small())
    for p in ["c1/a.png", "c1/b.png", "c2/c.png"]:
        os.utime(os.path.join(root, p), ns=(10**18, 10**18))

    def fp():
        return images.image_list_fingerprint(images.make_image_source(_folder(root)))

    first = fp()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert fp() == first  # nothing changed

    os.utime(os.path.join(root, "c1", "b.png"), ns=(10**18 + 1, 10**18 + 1))
    touched = fp()
    assert touched != first

    _write(os.path.join(root, "c2", "d.png"), _small())
    added = fp()
    assert added not in (first, touched)

    os.rename(os.path.join(root, "c2", "d.png"), os.path.join(root, "c2", "e.png"))
    renamed = fp()
    assert renamed not in (first, touched, added)

    os.rename(os.path.join(root, "c2", "e.png"), os.path.join(root, "c3.png"))  # moved to another class
    assert fp() not in (first, touched, added, renamed)


# ----------------------------------------------------------------------------------------------------------------
# Embedded set
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    cfg = config.EmbeddedDataset(cache_dir=str(tmp_path_factory.mktemp("embedded_a")))
    return cfg, embedded_set.ensure_embedded_images(cfg)


def _all_files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/") for d, _, fs in os.walk(root) for f in fs
    )


def test_embedded_set_has_336_rgb_224px_images_in_21_photo_classes(embedded):
    """docs/embedded-images.md: with the default config, 21 photos x 16 crops = 336 images in 21 classes."""
    cfg, folder = embedded
    assert cfg.n_imgs_per_photo == 16
    src = images.make_image_source(cfg)
    assert src.root == folder
    assert len(src) == 336 >= 256
    assert len(src.class_names) == 21
    assert "" not in src.class_names
    assert set(src.class_names) == {name for name, _ in embedded_set.EMBEDDED_PHOTOS}
    counts = np.bincount(src.labels, minlength=len(src.class_names))
    assert counts.tolist() == [16] * 21
    for i in range(len(src)):
        with Image.open(src.abspath(i)) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (224, 224)
        assert src.class_names[src.labels[i]] == src.paths[i].split("/")[0]
    assert len(_all_files(folder)) == len(src)  # nothing else in the folder
    assert {os.stat(src.abspath(i)).st_mtime_ns for i in range(len(src))} == {embedded_set.EMBEDDED_MTIME_NS}


def test_embedded_set_is_reused_without_loading_photos(embedded, monkeypatch):
    cfg, folder = embedded

    def fail(*args):
        raise AssertionError("the photos were loaded again")

    monkeypatch.setattr(embedded_set, "load_photos", fail)
    assert embedded_set.ensure_embedded_images(cfg) == folder


def test_embedded_generation_is_deterministic_across_cache_dirs(embedded, tmp_path):
    cfg_a, folder_a = embedded
    cfg_b = config.EmbeddedDataset(cache_dir=str(tmp_path / "b"))
    folder_b = embedded_set.ensure_embedded_images(cfg_b)
    assert folder_b != folder_a
    files = _all_files(folder_a)
    assert _all_files(folder_b) == files
    for rel in files[::13]:
        with open(os.path.join(folder_a, rel), "rb") as fa, open(os.path.join(folder_b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel
    src_a, src_b = images.make_image_source(cfg_a), images.make_image_source(cfg_b)
    assert images.image_list_fingerprint(src_a) == images.image_list_fingerprint(src_b)
    # the photos differ from one another (not one photo repeated)
    a0 = np.asarray(Image.open(os.path.join(folder_a, files[0])))
    assert not np.array_equal(a0, np.asarray(Image.open(os.path.join(folder_a, files[-1]))))


def test_killed_generation_is_not_taken_as_complete(embedded, tmp_path, monkeypatch):
    _, folder_a = embedded
    cache = tmp_path / "killed"
    cfg = config.EmbeddedDataset(cache_dir=str(cache))
    final = os.path.join(str(cache), os.path.basename(folder_a))

    # a temp folder left by a run killed long ago (SIGKILL: no cleanup ran), with a few files in it
    leftover = cache / f".{os.path.basename(final)}.tmp-1-dead"
    (leftover / "astronaut").mkdir(parents=True)
    (leftover / "astronaut" / "000.png").write_bytes(b"partial")
    os.utime(leftover, (1, 1))

    # this run is "killed" after two photos
    real_write = embedded_set._write_crops
    calls = []

    def write_then_die(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args)
        real_write(*args)

    monkeypatch.setattr(embedded_set, "_write_crops", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        embedded_set.ensure_embedded_images(cfg)
    assert not os.path.exists(final)
    assert os.listdir(cache) == []  # the stale leftover and this run's temp folder are both gone

    # a fresh leftover (a generation that may still be running elsewhere) is left alone and never used
    (leftover / "astronaut").mkdir(parents=True)
    (leftover / "astronaut" / "000.png").write_bytes(b"partial")
    monkeypatch.setattr(embedded_set, "_write_crops", real_write)
    assert embedded_set.ensure_embedded_images(cfg) == final
    assert _all_files(final) == _all_files(folder_a)
    assert sorted(os.listdir(cache)) == sorted([leftover.name, os.path.basename(final)])


def test_photos_that_fail_to_load_are_skipped_and_the_set_still_reaches_256(tmp_path, monkeypatch):
    def broken():
        raise OSError("needs a download")

    keep = {"camera", "coins"}
    photos = (("broken", broken),) + tuple(p for p in embedded_set.EMBEDDED_PHOTOS if p[0] in keep)
    monkeypatch.setattr(embedded_set, "EMBEDDED_PHOTOS", photos)
    cfg = config.EmbeddedDataset(cache_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="broken.*needs a download"):
        folder = embedded_set.ensure_embedded_images(cfg)
    src = images.make_image_source(cfg)
    assert src.root == folder
    assert src.class_names == sorted(keep)
    assert len(src) >= 256


def test_docs_table_lists_every_embedded_photo():
    with open(DOCS) as f:
        rows = [line for line in f if line.startswith("|")]
    named = {line.split("|")[1].strip().strip("`") for line in rows}
    assert {name for name, _ in embedded_set.EMBEDDED_PHOTOS} <= named
