"""Bad input to `activations`: exit 2, one message naming the value and the fix, no traceback, and no store that
looks complete."""

import io
import os

import pytest
import zarr
from PIL import Image

from saev_core.__main__ import main
from tests.helpers import activations_argv, write_images


def run(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    return captured.err


def no_complete_store(dump_to) -> bool:
    if not os.path.isdir(dump_to):
        return True
    for key in os.listdir(dump_to):
        group = zarr.open_group(os.path.join(dump_to, key), mode="r")
        if group.attrs.get("format_version") and group["progress"][:].all():
            return False
    return True


@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "imgs", 3)
    return tmp_path / "imgs"


def argv(ckpt, root, dump_to, *extra, data=()):
    return activations_argv(ckpt, root, dump_to, *extra, family=None, data_flags=data)


def test_empty_image_folder(capsys, tmp_path, tiny_clip_ckpt):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    err = run(capsys, argv(tiny_clip_ckpt, tmp_path / "empty", tmp_path / "acts"))
    assert str(tmp_path / "empty") in err and "no images" in err.lower()
    assert no_complete_store(tmp_path / "acts")


def test_truncated_jpeg_names_the_file_and_the_skip_flag(capsys, folder, tmp_path, tiny_clip_ckpt):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="JPEG")
    (folder / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts"))
    assert "dog/truncated.jpg" in err and "--data.skip-bad" in err
    assert no_complete_store(tmp_path / "acts")


def test_d_vit_mismatch(capsys, folder, tmp_path, tiny_clip_ckpt):
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts", "--d-vit", "768"))
    assert "768" in err and "--d-vit 64" in err
    assert no_complete_store(tmp_path / "acts")


def test_n_patches_mismatch(capsys, folder, tmp_path, tiny_clip_ckpt):
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts", "--n-patches-per-img", "196"))
    assert "196" in err and "--n-patches-per-img 49" in err
    assert no_complete_store(tmp_path / "acts")


def test_layer_out_of_range(capsys, folder, tmp_path, tiny_clip_ckpt):
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts", "--vit-layers", "5"))
    assert "5" in err and "2 blocks" in err and "-2..1" in err
    assert no_complete_store(tmp_path / "acts")


def test_unknown_family(capsys, folder, tmp_path, tiny_clip_ckpt):
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts", "--vit-family", "convnext"))
    assert "'convnext'" in err and "clip" in err and "dinov2" in err


def test_unknown_architecture(capsys, folder, tmp_path, tiny_clip_ckpt):
    weights = tiny_clip_ckpt.split("/", 1)[1]
    err = run(capsys, argv(f"ViT-Q-99/{weights}", folder, tmp_path / "acts"))
    assert "ViT-Q-99" in err and "list_models" in err


def test_cls_token_with_siglip(capsys, folder, tmp_path, siglip_ckpt):
    err = run(capsys, argv(siglip_ckpt, folder, tmp_path / "acts", "--vit-family", "siglip", "--cls-token"))
    assert "--no-cls-token" in err
    assert no_complete_store(tmp_path / "acts")


def test_dump_to_is_a_file(capsys, folder, tmp_path, tiny_clip_ckpt):
    target = tmp_path / "acts.txt"
    target.write_text("precious data")
    err = run(capsys, argv(tiny_clip_ckpt, folder, target))
    assert str(target) in err and "folder" in err
    assert target.read_text() == "precious data"


def test_missing_checkpoint_file(capsys, folder, tmp_path):
    err = run(capsys, argv("ViT-B-32/nowhere/weights.pt", folder, tmp_path / "acts"))
    assert "nowhere/weights.pt" in err and "does not exist" in err


def test_zero_batch_size(capsys, folder, tmp_path, tiny_clip_ckpt):
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts", "--vit-batch-size", "0"))
    assert "--vit-batch-size 0" in err
    assert no_complete_store(tmp_path / "acts") and not os.path.exists(tmp_path / "acts")


def test_cuda_asked_for_without_a_gpu(capsys, folder, tmp_path, tiny_clip_ckpt, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = run(capsys, argv(tiny_clip_ckpt, folder, tmp_path / "acts", "--device", "cuda"))
    assert "--device cuda" in err and "--device cpu" in err


def test_corrupt_checkpoint_file(capsys, folder, tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"\x80\x04 not a pickle at all")
    err = run(capsys, argv(f"saev-tiny-clip/{tmp_path / 'broken.pt'}", folder, tmp_path / "acts"))
    assert "broken.pt" in err and "could not load" in err


def test_pipeline_with_no_layers(capsys, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[activations]\nvit_layers = []\n")
    err = run(capsys, ["pipeline", "--path", str(path)])
    assert "vit_layers" in err and str(path) in err


def test_a_vit_batch_beyond_free_memory_is_refused_before_anything_is_loaded(monkeypatch):
    """The estimate is a lower bound (residual stream + one MLP hidden layer, float32), named in the message."""
    from saev_core.config import machine
    from saev_core.errors import UserError
    from saev_core.record import vit

    want = 64 * 50 * 768 * 4 * 5  # the documented estimate, by hand
    monkeypatch.setattr(machine, "available_memory", lambda device: want - 1)
    with pytest.raises(UserError, match=r"--vit-batch-size 64: one ViT forward pass .* need about .*Lower"):
        vit.check_forward_memory(64, 50, 768, "cpu", "--vit-batch-size")
    monkeypatch.setattr(machine, "available_memory", lambda device: want)
    vit.check_forward_memory(64, 50, 768, "cpu", "--vit-batch-size")  # exactly enough: allowed
