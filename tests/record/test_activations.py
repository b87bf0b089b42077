"""Recording through the CLI into a store, checked against independent re-computations."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from saev_core.__main__ import main
from saev_core.config import ImageFolderDataset
from saev_core.record import images
from saev_core.record import vit as vitlib
from saev_core.store import ActivationStore
from tests.helpers import activations_argv, same_files, write_images


def record(capsys, ckpt, root, dump_to, *extra, family="clip", data_flags=()) -> str:
    assert main(activations_argv(ckpt, root, dump_to, *extra, family=family, data_flags=data_flags)) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def independent_acts(family: str, ckpt: str, root: str, rels: list[str], blocks: list[int], tokens) -> np.ndarray:
    """Plain forward hooks on the raw library model's blocks; [n_layers, n_imgs, n_tokens, d]."""
    model = vitlib.make_vit(family, ckpt)
    raw_blocks = {
        "clip": lambda m: m.model.transformer.resblocks,
        "siglip": lambda m: m.model.trunk.blocks,
        "dinov2": lambda m: m.model.blocks,
    }[family](model)
    transform = vitlib.make_img_transform(family, ckpt)
    x = torch.stack([transform(Image.open(os.path.join(root, rel)).convert("RGB")) for rel in rels])
    outs = {}
    hooks = [raw_blocks[b].register_forward_hook(lambda m, i, o, b=b: outs.__setitem__(b, o)) for b in blocks]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return np.stack([tokens(outs[b]).numpy() for b in blocks])


def test_clip_vit_b32_store_equals_independent_hooks(capsys, tmp_path, vit_b32_ckpt):
    rels = write_images(tmp_path / "imgs", 6)
    path = record(
        capsys,
        vit_b32_ckpt,
        tmp_path / "imgs",
        tmp_path / "acts",
        "--vit-layers",
        "-2",
        "3",
        "--d-vit",
        "768",
        "--n-patches-per-img",
        "49",
        "--n-patches-per-shard",
        str(4 * 50 * 2),
        "--vit-batch-size",
        "3",
    )  # batches of 3 in blocks of 4: partial batches and block changes
    store = ActivationStore.open(path)
    want = independent_acts("clip", vit_b32_ckpt, str(tmp_path / "imgs"), sorted(rels), [10, 3], lambda o: o)
    np.testing.assert_allclose(store.array(-2)[:], want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(store.array(3)[:], want[1], atol=1e-5, rtol=0)
    assert store.layout.n_blocks == 2 and store.is_complete


def test_siglip_store_equals_independent_hooks(capsys, tmp_path, siglip_ckpt):
    rels = write_images(tmp_path / "imgs", 2)
    path = record(
        capsys,
        siglip_ckpt,
        tmp_path / "imgs",
        tmp_path / "acts",
        "--vit-layers",
        "-1",
        "--no-cls-token",
        family="siglip",
    )
    want = independent_acts("siglip", siglip_ckpt, str(tmp_path / "imgs"), sorted(rels), [11], lambda o: o)
    got = ActivationStore.open(path).array(-1)[:]
    assert got.shape == (2, 196, 768)
    np.testing.assert_allclose(got, want[0], atol=1e-5, rtol=0)


def test_dinov2_with_registers_store_keeps_cls_and_drops_registers(capsys, tmp_path, dinov2_reg_ckpt):
    rels = write_images(tmp_path / "imgs", 3)
    path = record(
        capsys, dinov2_reg_ckpt, tmp_path / "imgs", tmp_path / "acts", "--vit-layers", "-2", "0", family="dinov2"
    )
    # timm's dinov2-with-registers token order: [CLS, 4 registers, 256 patches].
    keep = lambda o: torch.cat([o[:, :1], o[:, 5:]], dim=1)  # noqa: E731
    want = independent_acts("dinov2", dinov2_reg_ckpt, str(tmp_path / "imgs"), sorted(rels), [10, 0], keep)
    store = ActivationStore.open(path)
    assert store.array(-2).shape == (3, 257, 384)
    np.testing.assert_allclose(store.array(-2)[:], want[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(store.array(0)[:], want[1], atol=1e-5, rtol=0)


def _store_files(path) -> dict[str, bytes]:
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            files[os.path.relpath(full, path)] = open(full, "rb").read()
    return files


def test_store_recorded_with_early_stop_is_byte_identical_to_a_full_pass_recording(
    capsys, tmp_path, monkeypatch, tiny_clip_ckpt
):
    """Layer 0 of the 2-block tiny CLIP: block 1 and the head never run. (Every family's early-stopped activations
    are compared bit for bit with full-pass hooks in test_vit; this checks the bytes of the whole store.)"""
    write_images(tmp_path / "imgs", 5)
    real = vitlib.RecordedVisionTransformer
    next_block_runs = {}

    def recorder_class(full_pass: bool):
        def build(*args, **kwargs):
            recorder = real(*args, **kwargs, full_pass=full_pass)
            after = recorder.vit.residual_blocks[max(recorder.resolved_layers) + 1]
            runs = next_block_runs.setdefault(full_pass, [])
            after.register_forward_pre_hook(lambda *_: runs.append(1))
            return recorder

        return build

    paths = {}
    for full_pass in (False, True):
        monkeypatch.setattr(vitlib, "RecordedVisionTransformer", recorder_class(full_pass))
        paths[full_pass] = record(
            capsys,
            tiny_clip_ckpt,
            tmp_path / "imgs",
            tmp_path / f"full{full_pass}",
            "--vit-layers",
            "0",
            "--n-patches-per-shard",
            str(2 * 50),
            "--vit-batch-size",
            "2",
        )
    assert next_block_runs[False] == [] and len(next_block_runs[True]) == 3  # 5 images in batches of 2
    early, full = _store_files(paths[False]), _store_files(paths[True])
    assert ActivationStore.open(paths[False]).layout.n_blocks > 1
    assert sorted(early) == sorted(full) and any(name.startswith("layer_0/c/") for name in early)
    assert all(early[name] == full[name] for name in full), [n for n in full if early[n] != full[n]]


def test_store_index_and_metadata(capsys, tmp_path, tiny_clip_ckpt):
    root = tmp_path / "imgs"
    rels = write_images(root, 7)
    (root / "Zebra").mkdir()
    Image.new("RGB", (40, 40)).save(root / "Zebra" / "a.JPG")
    path = record(capsys, tiny_clip_ckpt, root, tmp_path / "acts", "--vit-layers", "-1", "--seed", "7")
    store = ActivationStore.open(path)
    expected = sorted(rels + ["Zebra/a.JPG"])
    assert store.image_paths() == expected
    names = store.class_names
    assert [names[label] for label in store.image_labels()] == [p.split("/")[0] for p in expected]
    meta = store.metadata
    assert meta["vit_family"] == "clip" and meta["vit_ckpt"] == tiny_clip_ckpt
    assert meta["layers"] == [-1] and meta["resolved_layers"] == [1]
    assert (meta["d_vit"], meta["n_patches_per_img"], meta["cls_token"], meta["n_imgs"]) == (64, 49, True, 8)
    assert meta["seed"] == 7 and meta["n_patches_per_shard"] == 2_400_000 and meta["dtype"] == "float32"
    assert meta["data"]["kind"] == "image-folder-dataset"
    assert set(meta["fingerprints"]) == {"vit_ckpt", "images"}
    assert path == os.path.join(str(tmp_path / "acts"), meta["key"])


def test_new_weights_or_touched_images_give_a_new_store(capsys, tmp_path, tiny_clip_ckpt):
    root = tmp_path / "imgs"
    write_images(root, 4)
    first = record(capsys, tiny_clip_ckpt, root, tmp_path / "acts")
    assert record(capsys, tiny_clip_ckpt, root, tmp_path / "acts") == first  # same inputs: same store
    os.utime(root / "dog" / "img000.png", ns=(1, 1))
    touched = record(capsys, tiny_clip_ckpt, root, tmp_path / "acts")
    other_weights = vitlib.save_random_weights("clip", "saev-tiny-clip", tmp_path / "w2.pt", seed=1)
    reweighted = record(capsys, f"saev-tiny-clip/{other_weights}", root, tmp_path / "acts")
    assert len({first, touched, reweighted}) == 3


def test_float16_storage(capsys, tmp_path, tiny_clip_ckpt):
    write_images(tmp_path / "imgs", 3)
    p32 = record(capsys, tiny_clip_ckpt, tmp_path / "imgs", tmp_path / "a")
    p16 = record(capsys, tiny_clip_ckpt, tmp_path / "imgs", tmp_path / "a", "--dtype", "float16")
    a16 = ActivationStore.open(p16).array(-2)
    assert a16.dtype == np.float16
    np.testing.assert_allclose(a16[:].astype(np.float32), ActivationStore.open(p32).array(-2)[:], rtol=2e-3, atol=2e-3)


def test_skip_bad_records_the_bad_image_as_invalid(capsys, tmp_path, tiny_clip_ckpt):
    root = tmp_path / "imgs"
    write_images(root, 4)
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    path = record(capsys, tiny_clip_ckpt, root, tmp_path / "acts", data_flags=["--data.skip-bad"])
    store = ActivationStore.open(path)
    bad = store.image_paths().index("dog/broken.jpg")
    valid = store.valid_images()
    assert not valid[bad] and valid.sum() == 4
    assert np.all(store.array(-2)[bad] == 0) and np.any(store.array(-2)[0] != 0)


def test_dry_run_prints_size_and_writes_nothing(capsys, tmp_path, tiny_clip_ckpt):
    write_images(tmp_path / "imgs", 5)
    argv = [
        "activations",
        "--vit-ckpt",
        tiny_clip_ckpt,
        "--dump-to",
        str(tmp_path / "acts"),
        "--dry-run",
        "--vit-layers",
        "0",
        "1",
        "data:image-folder-dataset",
        "--data.root",
        str(tmp_path / "imgs"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    expected_gb = 5 * 50 * 64 * 4 * 2 / 1e9  # images x tokens x d_vit x float32 x layers
    assert f"{expected_gb:.3f} GB" in out[0]
    assert out[-1].startswith(str(tmp_path / "acts")) and not os.path.exists(out[-1])


def test_dry_run_refuses_when_the_disk_lacks_room(capsys, tmp_path, tiny_clip_ckpt, monkeypatch):
    import shutil
    from collections import namedtuple

    write_images(tmp_path / "imgs", 5)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 1000))
    code = main(
        [
            "activations",
            "--vit-ckpt",
            tiny_clip_ckpt,
            "--dump-to",
            str(tmp_path / "acts"),
            "--dry-run",
            "data:image-folder-dataset",
            "--data.root",
            str(tmp_path / "imgs"),
        ]
    )
    assert code == 2
    assert "has 1.0 kB free" in capsys.readouterr().err


# ---- resume after a real kill ----------------------------------------------------------------------------------


def _argv(ckpt, root, dump_to):
    return activations_argv(
        ckpt,
        root,
        dump_to,
        "--vit-layers",
        "0",
        "-1",
        "--n-patches-per-shard",
        str(4 * 50 * 2),
        "--vit-batch-size",
        "2",
        family=None,
    )


def _shard_mtimes(path) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(os.path.join(path, "layer_0", "c")):
        for f in files:
            out[os.path.join(dirpath, f)] = os.stat(os.path.join(dirpath, f)).st_mtime_ns
    return out


def test_resume_after_kill_writes_only_missing_blocks_and_matches(capsys, tmp_path, tiny_clip_ckpt):
    root = tmp_path / "imgs"
    write_images(root, 160, size=(224, 224))
    # The uninterrupted reference run.
    assert main(_argv(tiny_clip_ckpt, root, tmp_path / "ref")) == 0
    ref = ActivationStore.open(capsys.readouterr().out.strip().splitlines()[-1])

    cmd = [sys.executable, "-m", "saev_core", *_argv(tiny_clip_ckpt, root, tmp_path / "acts")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    store_path = os.path.join(str(tmp_path / "acts"), ref.metadata["key"])
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            done = int(zarr.open_group(store_path, mode="r")["progress"][:].sum())
        except Exception:
            done = 0
        if done >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = ActivationStore.open(store_path)
    missing = killed.missing_blocks()
    assert 0 < len(missing) < killed.layout.n_blocks, "the kill should land mid-way"
    complete_files = {f: t for f, t in _shard_mtimes(store_path).items() if int(f.split(os.sep)[-3]) not in missing}

    assert main(_argv(tiny_clip_ckpt, root, tmp_path / "acts")) == 0
    resumed = ActivationStore.open(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed.path == store_path and resumed.is_complete
    after = _shard_mtimes(store_path)
    assert all(after[f] == t for f, t in complete_files.items()), "complete blocks were rewritten"
    for layer in (0, -1):
        assert np.array_equal(resumed.array(layer)[:], ref.array(layer)[:])


# ---- one subprocess smoke test -----------------------------------------------------------------------------------


def test_cli_subprocess_prints_store_path_last(tmp_path, tiny_clip_ckpt):
    write_images(tmp_path / "imgs", 3)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "saev_core",
            "activations",
            "--vit-ckpt",
            tiny_clip_ckpt,
            "--n-workers",
            "0",
            "data:image-folder-dataset",
            "--data.root",
            str(tmp_path / "imgs"),
            "--dump-to",
            str(tmp_path / "acts"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    last = out.stdout.strip().splitlines()[-1]
    assert ActivationStore.open(last).is_complete
    source = images.make_image_source(ImageFolderDataset(root=str(tmp_path / "imgs")))
    assert images.image_list_fingerprint(source) == ActivationStore.open(last).metadata["fingerprints"]["images"]


def test_two_workers_on_disjoint_block_ranges_write_the_same_bytes_as_one(tmp_path, tiny_clip_ckpt):
    from saev_core import config
    from saev_core.record import recording

    write_images(tmp_path / "imgs", 7)
    base = dict(
        vit_family="clip",
        vit_ckpt=tiny_clip_ckpt,
        vit_layers=(0, -1),
        n_patches_per_shard=2 * 50 * 2,
        n_workers=0,
        vit_batch_size=2,
        data=config.ImageFolderDataset(root=str(tmp_path / "imgs")),
    )
    one = recording.record_activations(
        config.ActivationsConfig(**base, dump_to=str(tmp_path / "one")), show_progress=False
    )
    cfg = config.ActivationsConfig(**base, dump_to=str(tmp_path / "two"))
    path = recording.create_store(cfg)
    assert ActivationStore.open(path).missing_blocks() == [0, 1, 2, 3]
    parts = [recording.record_activations(cfg, show_progress=False, part=(i, 2)) for i in (1, 0)]
    assert [p.n_blocks_written for p in parts] == [2, 2] and ActivationStore.open(path).is_complete
    assert same_files(one.path, path)
    assert recording.block_part(10, 0, 3) == [0, 1, 2, 3] and recording.block_part(10, 2, 3) == [7, 8, 9]


def test_the_recording_writes_the_statistics_of_every_token_mode(tmp_path, tiny_clip_ckpt, capsys):
    from saev_core.store.stats import compute_stats

    write_images(tmp_path / "imgs", 4)
    store = ActivationStore.open(record(capsys, tiny_clip_ckpt, tmp_path / "imgs", tmp_path / "acts"))
    for mode in ("patches", "cls", "meanpool"):
        mean, scale = store.read_stats(-2, mode)
        want_mean, want_scale = compute_stats(store, -2, mode)
        np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
        assert scale == pytest.approx(want_scale, rel=1e-12)
