"""Heatmap overlays land on the part of the ORIGINAL image that the ViT saw as each patch.

References are independent of the code under test: crop boxes computed by hand in the tests, the real eval
transforms run on a coordinate-ramp image (so the transform itself says where each patch came from), and
matplotlib's colormap for the colour."""

import dataclasses
import json
import os

import matplotlib
import numpy as np
import pytest
from PIL import Image

from saev_core.errors import UserError
from saev_core.visuals.heatmaps import ViewGeometry, geometry_of_transform, overlay_heatmap, save_png

GRID = (7, 7)  # ViT-B/32 at 224 px


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """make_img_transform builds no model; it only checks that the weights file exists."""
    path = tmp_path_factory.mktemp("ckpt") / "weights.pt"
    path.write_bytes(b"")
    return str(path)


@pytest.fixture(scope="module")
def clip_transform(weights_file):
    from saev_core.record.vit import make_img_transform

    return make_img_transform("clip", f"ViT-B-32/{weights_file}")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def hand_patch_box(box, grid, r, c):
    left, top, right, bottom = box
    pw, ph = (right - left) / grid[1], (bottom - top) / grid[0]
    return left + c * pw, top + r * ph, left + (c + 1) * pw, top + (r + 1) * ph


def inner(box, margin=1.0):
    """Integer pixel slice strictly inside a float box (pixels whose whole area is in it, less a margin)."""
    left, top, right, bottom = box
    return (
        slice(int(np.ceil(top + margin)), int(np.floor(bottom - margin))),
        slice(int(np.ceil(left + margin)), int(np.floor(right - margin))),
    )


# ------------------------------------------------------------------------------------------------------------
# Crop boxes against hand-computed numbers
# ------------------------------------------------------------------------------------------------------------


def test_open_clip_vit_b32_box_on_a_wide_image_is_the_centre_square(clip_transform):
    geometry = geometry_of_transform(clip_transform)
    # 300x200: scale 224/200 = 1.12 -> 336x224, crop offset (336-224)/2 = 56 px = 50 original px.
    assert geometry.crop_box(300, 200) == pytest.approx((50.0, 0.0, 250.0, 200.0))
    # Tall image 200x300: the crop is centred vertically.
    assert geometry.crop_box(200, 300) == pytest.approx((0.0, 50.0, 200.0, 250.0))


def test_squash_box_is_the_whole_image(weights_file):
    from saev_core.record.vit import make_img_transform

    geometry = geometry_of_transform(make_img_transform("siglip", f"ViT-B-16-SigLIP/{weights_file}"))
    assert geometry == ViewGeometry(resize=(224, 224))
    assert geometry.crop_box(300, 200) == pytest.approx((0.0, 0.0, 300.0, 200.0))


def test_resize_256_crop_224_box_matches_hand_numbers():
    import timm.data

    # Resize(256): 300x200 -> 384x256; crop offsets (384-224)/2 = 80, (256-224)/2 = 16; back by 300/384, 200/256.
    expected = (80 * 300 / 384, 16 * 200 / 256, 304 * 300 / 384, 240 * 200 / 256)
    assert expected == (62.5, 12.5, 237.5, 187.5)
    assert ViewGeometry(resize=256, crop=224).crop_box(300, 200) == pytest.approx(expected)
    timm_eval = timm.data.create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic")
    assert geometry_of_transform(timm_eval).crop_box(300, 200) == pytest.approx(expected)


def test_dinov2_family_transform_is_read_from_the_real_transform(weights_file):
    from saev_core.record.vit import make_img_transform

    # timm's DINOv2 config has crop_pct 1.0: Resize(224) + CenterCrop(224), not 256 -> 224.
    t = make_img_transform("dinov2", f"vit_small_patch14_reg4_dinov2/{weights_file}")
    assert geometry_of_transform(t).crop_box(300, 200) == pytest.approx((50.0, 0.0, 250.0, 200.0))


def test_torchvision_truncates_the_long_side_and_rounds_the_crop_offset():
    # 301x200 -> int(224 * 301 / 200) = int(337.12) = 337 wide; offset round(113 / 2) = round(56.5) = 56 (even).
    sx = 301 / 337
    assert ViewGeometry(resize=224, crop=224).crop_box(301, 200) == pytest.approx((56 * sx, 0.0, 280 * sx, 200.0))


def test_geometry_round_trips_through_json():
    geometry = ViewGeometry(resize=(224, 224), crop=224, longest=1.0)
    again = ViewGeometry(**json.loads(json.dumps(dataclasses.asdict(geometry))))
    assert again == geometry and again.crop == (224, 224)


def test_torchvision_v2_resize_of_one_size_means_shortest_side():
    import torchvision.transforms.v2 as T2

    geometry = geometry_of_transform(T2.Compose([T2.Resize(224), T2.CenterCrop(224), T2.ToImage()]))
    assert geometry == ViewGeometry(resize=224, crop=(224, 224))


def test_unknown_transform_step_is_refused_by_name():
    import torchvision.transforms as T

    with pytest.raises(ValueError, match="RandomResizedCrop"):
        geometry_of_transform(T.Compose([T.RandomResizedCrop(224), T.ToTensor()]))
    with pytest.raises(ValueError, match="max_size"):
        geometry_of_transform(T.Compose([T.Resize(224, max_size=300), T.CenterCrop(224)]))


def _geometric_steps(transform):
    steps = []
    for step in transform.transforms:
        if type(step).__name__ in ("MaybeToTensor", "ToTensor"):
            break
        steps.append(step)
    return steps


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest", "timm-256", "open_clip-nonsquare"])
def test_patch_centres_match_where_the_real_transform_takes_its_pixels(mode):
    """Run the real transform on an image whose red/green channels encode x/y: the pixel at each patch centre of
    the ViT input says which original coordinate it came from."""
    import timm.data
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if mode == "timm-256":
        transform = timm.data.create_transform(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic")
    elif mode == "open_clip-nonsquare":
        transform = image_transform_v2(PreprocessCfg(size=(224, 160), resize_mode="shortest"), is_train=False)
    else:
        transform = image_transform_v2(PreprocessCfg(size=224, resize_mode=mode), is_train=False)
    width, height = 256, 180
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    ramp = np.stack([xs * 255 / (width - 1), ys * 255 / (height - 1), np.zeros_like(xs)], axis=-1)
    img = Image.fromarray(np.rint(ramp).astype(np.uint8), mode="RGB")
    seen = img
    for step in _geometric_steps(transform):
        seen = step(seen)
    seen = np.asarray(seen, dtype=np.float64)
    in_h, in_w = seen.shape[:2]
    rows, cols = in_h // 16, in_w // 16

    left, top, right, bottom = geometry_of_transform(transform).crop_box(width, height)
    checked = 0
    for r in range(rows):
        for c in range(cols):
            x = left + (c + 0.5) * (right - left) / cols
            y = top + (r + 0.5) * (bottom - top) / rows
            if not (3 < x < width - 3 and 3 < y < height - 3):
                continue  # padding (longest) or the ramp's clamped edge
            px = seen[int((r + 0.5) * in_h / rows), int((c + 0.5) * in_w / cols)]
            assert px[0] * (width - 1) / 255 + 0.5 == pytest.approx(x, abs=2.0), (mode, r, c)
            assert px[1] * (height - 1) / 255 + 0.5 == pytest.approx(y, abs=2.0), (mode, r, c)
            checked += 1
    assert checked >= rows * cols // 2


# ------------------------------------------------------------------------------------------------------------
# Overlays
# ------------------------------------------------------------------------------------------------------------


def patch_diffs(before, after, box, grid):
    diffs = np.zeros(grid)
    for r in range(grid[0]):
        for c in range(grid[1]):
            ys, xs = inner(hand_patch_box(box, grid, r, c))
            diffs[r, c] = np.abs(after[ys, xs].astype(int) - before[ys, xs].astype(int)).mean()
    return diffs


def test_overlay_lands_on_the_planted_patch_of_a_wide_image(clip_transform):
    img = random_image(300, 200)
    box = geometry_of_transform(clip_transform).crop_box(300, 200)
    values = np.zeros(49, dtype=np.float32)
    values[2 * 7 + 5] = 3.0  # the latent's top patch (2, 5)
    values[4 * 7 + 1] = 1.0  # a third as strong at (4, 1)
    out = overlay_heatmap(img, values, GRID, box, vmax=3.0, max_alpha=0.6)
    assert out.size == (300, 200)
    before, after = np.asarray(img), np.asarray(out)

    # By hand: scale 224/200, crop offset (300 * 224/200 - 224) / 2 = 56 resized px = 50 original px; patches are
    # 200/7 original px. Patch (2, 5) is x in [50 + 5*200/7, 50 + 6*200/7), y in [2*200/7, 3*200/7).
    hand_box = (50 + 5 * 200 / 7, 2 * 200 / 7, 50 + 6 * 200 / 7, 3 * 200 / 7)
    diffs = patch_diffs(before, after, (50.0, 0.0, 250.0, 200.0), GRID)
    assert np.unravel_index(diffs.argmax(), diffs.shape) == (2, 5)
    assert diffs[4, 1] > 0 and diffs[4, 1] < diffs[2, 5]
    zero = np.ones(GRID, dtype=bool)
    zero[2, 5] = zero[4, 1] = False
    assert (diffs[zero] == 0).all()

    # The top patch is blended with alpha 0.6 towards plasma(1.0), matplotlib's own colour.
    ys, xs = inner(hand_box)
    top_colour = np.array(matplotlib.colormaps["plasma"](1.0)[:3]) * 255
    expected = 0.4 * before[ys, xs] + 0.6 * top_colour
    assert np.abs(after[ys, xs] - expected).max() <= 1.0

    # Outside the crop box (left and right strips) nothing changes, to the bit.
    assert np.array_equal(after[:, :50], before[:, :50])
    assert np.array_equal(after[:, 250:], before[:, 250:])
    # Changed pixels all lie inside the two planted patches (with a pixel of slack at their edges).
    changed = np.argwhere((after != before).any(axis=-1))
    for y, x in changed:
        in_top = hand_box[0] - 1 <= x <= hand_box[2] + 1 and hand_box[1] - 1 <= y <= hand_box[3] + 1
        second = hand_patch_box((50.0, 0.0, 250.0, 200.0), GRID, 4, 1)
        in_second = second[0] - 1 <= x <= second[2] + 1 and second[1] - 1 <= y <= second[3] + 1
        assert in_top or in_second, (x, y)


def test_zero_negative_and_nan_patches_leave_pixels_exactly_unchanged():
    img = random_image(120, 90, seed=1)
    values = np.zeros(49)
    values[0], values[1], values[2] = -5.0, np.nan, 0.0
    out = overlay_heatmap(img, values, GRID, (0.0, 0.0, 120.0, 90.0), vmax=2.0)
    assert np.array_equal(np.asarray(out), np.asarray(img))
    # vmax <= 0 (a latent that never fired) draws nothing either.
    out = overlay_heatmap(img, np.ones(49), GRID, (0.0, 0.0, 120.0, 90.0), vmax=0.0)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_large_image_is_shrunk_to_the_shortest_side_and_the_box_follows(clip_transform):
    img = random_image(900, 600, seed=2)
    box = geometry_of_transform(clip_transform).crop_box(900, 600)
    assert box == pytest.approx((150.0, 0.0, 750.0, 600.0))
    values = np.zeros(49)
    values[3 * 7 + 6] = 1.0  # right-most column, middle row
    out = overlay_heatmap(img, values, GRID, box, vmax=1.0, shortest_side=224)
    assert out.size == (336, 224)
    small = np.asarray(img.resize((336, 224), Image.Resampling.BILINEAR, reducing_gap=2.0))
    # In the 336x224 render the box is (56, 0, 280, 224), patches 32 px.
    diffs = patch_diffs(small, np.asarray(out), (56.0, 0.0, 280.0, 224.0), GRID)
    assert np.unravel_index(diffs.argmax(), diffs.shape) == (3, 6)
    assert np.array_equal(np.asarray(out)[:, :56], small[:, :56])
    assert np.array_equal(np.asarray(out)[:, 280:], small[:, 280:])


def test_small_image_is_never_enlarged():
    out = overlay_heatmap(random_image(100, 80), np.ones(49), GRID, (0.0, 0.0, 100.0, 80.0), vmax=1.0)
    assert out.size == (100, 80)


def test_values_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="grid"):
        overlay_heatmap(random_image(50, 50), np.ones(48), GRID, (0.0, 0.0, 50.0, 50.0), vmax=1.0)


def test_save_png_round_trips_and_leaves_no_temporary_file(tmp_path):
    img = random_image(64, 48, seed=3)
    path = tmp_path / "0.png"
    assert save_png(img, path) == str(path)
    save_png(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), path)  # overwrite in place
    assert os.listdir(tmp_path) == ["0.png"]
    with Image.open(path) as again:
        assert np.array_equal(np.asarray(again), np.asarray(img)[:, ::-1])
    (tmp_path / "dir.png").mkdir()  # the rename fails after the PNG is written: its temporary must go
    with pytest.raises(UserError, match="it is a folder"):
        save_png(img, tmp_path / "dir.png")
    assert sorted(os.listdir(tmp_path)) == ["0.png", "dir.png"]
    assert save_png(img, tmp_path / "missing" / "1.png") == str(tmp_path / "missing" / "1.png")  # folder made
