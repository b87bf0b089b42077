"""Bad input, as a class: every row goes through the real CLI in a subprocess and must end in exit 2, one error line
naming the offending flag, key or file, no traceback, no torch advice to unpickle untrusted code, and a good store
and checkpoint (made once per module) byte-identical afterwards. Then: what a crash leaves behind is cleaned up by
the rerun. Object storage: missing credentials, a missing bucket (a local moto server), a refused and a silent
endpoint (loopback sockets) each end in one line naming the URL and the fix, with no network.

Rows are cheap: most fail while the config is built or before a model is loaded. Disk-full and read-only rows use
a small tmpfs when the test may mount one (root); a non-root run uses chmod for read-only and skips disk-full.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import TINY_SAE_FLAGS, activations_argv, tiny_pipeline_text, write_images
from tests.processes import free_port, moto_server

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
LAYER = "-1"
TRAIN_ARGS = [
    "--data.layer",
    LAYER,
    *TINY_SAE_FLAGS,
    "--n-patches",
    "1024",
    "--sae-batch-size",
    "64",
    "--lr",
    "1e-3",
    "--n-lr-warmup",
    "2",
    "--device",
    "cpu",
    "--n-threads",
    "1",
]


# ----------------------------------------------------------------------------------------------------------------
# The good store and checkpoint, made once
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    root: Path
    images: Path
    vit_ckpt: str
    store: str
    ckpt: str
    """A finished member's sae.pt."""
    interrupted: Path
    """A --ckpt-path whose training was killed after its step-12 checkpoint (pointer and train_state files)."""

    def activations(self, *extra: str, dump_to: str | Path | None = None) -> list[str]:
        return activations_argv(
            self.vit_ckpt,
            self.images,
            dump_to or self.root / "acts",
            "--vit-layers",
            LAYER,
            "--n-patches-per-shard",
            "200",
            "--device",
            "cpu",
            *extra,
        )

    def train(self, *extra: str, ckpt_path: str | Path, shard_root: str | None = None) -> list[str]:
        return [
            "train",
            "--data.shard-root",
            shard_root or self.store,
            *TRAIN_ARGS,
            "--ckpt-path",
            str(ckpt_path),
            *extra,
        ]

    def visuals(self, ckpt: str | Path, *extra: str, dump_to: str | Path) -> list[str]:
        return ["visuals", "--ckpt", str(ckpt), "--dump-to", str(dump_to), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_clip_ckpt) -> World:
    from saev_core.__main__ import main
    from saev_core.train import results

    root = tmp_path_factory.mktemp("bad_inputs")
    write_images(root / "imgs", 8)
    w = World(root, root / "imgs", tiny_clip_ckpt, "", "", root / "interrupted")
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(w.activations()) == 0
    [store] = glob.glob(str(root / "acts" / "*"))
    w = dataclasses.replace(w, store=store)
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        assert main(w.train(ckpt_path=root / "ckpts")) == 0
    [ckpt] = glob.glob(str(root / "ckpts" / "*" / "sae.pt"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after its last checkpoint, before its final files

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(open(os.devnull, "w")):
        mp.setattr(results, "write_member", killed)
        assert main(w.train("--ckpt-every", "4", ckpt_path=w.interrupted)) == 130
    assert glob.glob(str(w.interrupted / "group-*.json")) and glob.glob(str(w.interrupted / "*" / "train_state-12.pt"))
    return dataclasses.replace(w, ckpt=ckpt)


def tree_hashes(*folders: str | Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------------------------------------------
# File-system helpers: a small tmpfs when we may mount one
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mounts():
    """mount(path, size, read_only) -> path: a tmpfs there (skips the test when this user cannot mount)."""
    done = []

    def mount(path: Path, size: str = "64k", read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if not IS_ROOT:
            pytest.skip("needs a small tmpfs, which only root may mount here")
        opts = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        done.append(path)
        return path

    yield mount
    for path in reversed(done):
        subprocess.run(["umount", "-l", str(path)], check=False)


def read_only_folder(path: Path, mounts) -> Path:
    """A folder this process cannot write: a read-only tmpfs as root (chmod does not stop root), chmod 555 else."""
    if IS_ROOT:
        return mounts(path, read_only=True)
    path.mkdir(parents=True)
    path.chmod(0o555)
    return path


def full_disk(path: Path, mounts) -> Path:
    """A folder on a 64 KB tmpfs: room for small files, not for a checkpoint."""
    return mounts(path, size="64k")


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


BLOCK_S3FS = "import sys; sys.modules['s3fs'] = None"  # s3fs not installed, as far as this process can tell
LOCK_FOLDER = textwrap.dedent("""
    import os
    _scandir = os.scandir
    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return _scandir(path)
    os.scandir = scandir
""")
"""As root a chmod 000 folder is still listed: make it unlistable in the subprocess, as it would be for a user."""


TINY_MEMORY = "from saev_core.config import machine\nmachine.available_memory = lambda device: 10_000\n"
"""The machine has 10 kB free: every memory estimate is above it."""


@dataclasses.dataclass(frozen=True)
class Call:
    argv: list[str]
    patch: str = ""
    """Python run in the subprocess before the CLI (simulates a missing package or an unlistable folder)."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Environment variables set for the subprocess (a value None: removed)."""


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    make: Callable[["World", Path, Callable], Call]
    """(world, scratch folder, mounts) -> the call; may write bad files into the scratch folder."""
    names: Callable[["World", Path], list[str]]
    """What stderr must mention: the flag, key or file."""


def row(id, make, *names, named=None):
    return Row(id, make, named or (lambda w, t: [n.format(t=t, w=w) for n in names]))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def pipeline_file(w: World, t: Path, edit: Callable[[str], str]) -> Call:
    text = tiny_pipeline_text(t, w.vit_ckpt, [-1]).replace(f'root = "{t / "imgs"}"', f'root = "{w.images}"')
    return Call(["pipeline", "--path", str(write(t / "p.toml", edit(text)))])


def random_weights_at(w: World, t: Path, weights: Path) -> Call:
    """A pipeline whose [demo] random_vit creates the tiny ViT's random weights at ``weights``."""
    at = f'vit_ckpt = "saev-tiny-clip/{weights}"'
    return pipeline_file(w, t, lambda s: s.replace(f'vit_ckpt = "{w.vit_ckpt}"', at) + "\n[demo]\nrandom_vit = true\n")


def replace_table(text: str, table: str, body: str) -> str:
    """``text`` with ``body`` added at the top of ``[table]`` (later duplicates would be a TOML error)."""
    return text.replace(f"[{table}]\n", f"[{table}]\n{body}\n", 1)


def sae_file(t: Path, header: dict | None = None, state=None, raw: bytes | None = None) -> Path:
    """An SAE file: one JSON header line and a torch payload, or raw bytes."""
    import io

    if raw is None:
        buf = io.BytesIO()
        torch.save(state, buf)
        raw = (json.dumps(header) + "\n").encode() + buf.getvalue()
    return write(t / "bad" / "sae.pt", raw)


def good_header(w: World) -> dict:
    with open(w.ckpt, "rb") as f:
        return json.loads(f.readline())


def good_state(w: World) -> dict:
    with open(w.ckpt, "rb") as f:
        f.readline()
        return torch.load(f, weights_only=True)


def with_cfg(w: World, **cfg) -> dict:
    header = good_header(w)
    return {**header, "cfg": {**header["cfg"], **cfg}}


def pickled_object(path: Path) -> Path:
    """A weights file whose pickle holds an object (torch's weights-only loader refuses it, with advice to retry
    unsafely that must not reach the user)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"visual.proj": Path("x")}, path)
    return path


def trained_on_layer_0(w: World, t: Path) -> Path:
    """The good SAE, its provenance saying it was trained on layer 0 (the store holds layer -1 only)."""
    header = good_header(w)
    return sae_file(t, {**header, "provenance": {**header["provenance"], "layer": 0}}, good_state(w))


def damaged_resume(w: World, t: Path, damage: Callable[[Path], None]) -> Call:
    ckpts = t / "ckpts"
    shutil.copytree(w.interrupted, ckpts)
    damage(ckpts)
    return Call(w.train("--ckpt-every", "4", ckpt_path=ckpts))


def state_file(ckpts: Path) -> Path:
    return Path(glob.glob(str(ckpts / "*" / "train_state-12.pt"))[0])


def pointer_file(ckpts: Path) -> Path:
    return Path(glob.glob(str(ckpts / "group-*.json"))[0])


def cut_pointer_and_states(ckpts: Path) -> None:
    write(pointer_file(ckpts), '{"step": 1')
    for path in glob.glob(str(ckpts / "*" / "train_state-*.pt")):
        os.remove(path)


def store_copy_with(w: World, t: Path, value: float, split: str, n_imgs: int | None = None) -> str:
    """A copy of the good store with activation [1, 3] set to ``value`` in the first ``n_imgs`` (all when None) of
    the images the default training config puts in ``split`` ("train" or "val")."""
    from saev_core import config
    from saev_core.store import ActivationStore
    from saev_core.store.loader import split_images

    copy = t / "acts" / os.path.basename(w.store)
    shutil.copytree(w.store, copy)
    store = ActivationStore.open(str(copy), mode="r+")
    train, val = split_images(store, config.DataLoadConfig().val_frac, config.TrainConfig().seed)
    arr = store.array(int(LAYER))
    for image in {"train": train, "val": val}[split][:n_imgs]:
        img = arr[int(image)]
        img[1, 3] = value
        arr[int(image)] = img
    return str(copy)


def poisoned_heldout_store(w: World, t: Path) -> str:
    """A copy of the good store with NaN in one held-out image (the training split stays clean)."""
    return store_copy_with(w, t, np.nan, "val", n_imgs=1)


def huge_value_store(w: World, t: Path) -> str:
    """A copy of the good store with one activation of 3e38 in each training image: finite, its square is not."""
    return store_copy_with(w, t, 3e38, "train")


def unlistable_subfolder(w: World, t: Path) -> Call:
    images = t / "imgs"
    shutil.copytree(w.images, images)
    locked = images / "locked"
    write(locked / "a.png", (w.images / "cat" / "img001.png").read_bytes())
    if not IS_ROOT:
        locked.chmod(0)
    argv = w.activations(dump_to=t / "acts")
    return Call(argv[:-1] + [str(images)], patch=LOCK_FOLDER if IS_ROOT else "")


def non_utf8_name(w: World, t: Path) -> Call:
    images = t / "imgs"
    shutil.copytree(w.images, images)
    with open(os.path.join(os.fsencode(images), b"caf\xe9.png"), "wb") as f:
        f.write((w.images / "cat" / "img001.png").read_bytes())
    argv = w.activations(dump_to=t / "acts")
    return Call(argv[:-1] + [str(images)])


def undecodable_image(w: World, t: Path) -> Call:
    """The store is created, then the first block fails: the run must not leave that empty store behind."""
    images = t / "imgs"
    shutil.copytree(w.images, images)
    write(images / "cat" / "bad.png", b"\x89PNG not really")
    argv = w.activations(dump_to=t / "acts")
    return Call(argv[:-1] + [str(images)])


def seg_folder(w: World, t: Path, damage: Callable[[Path], None]) -> Call:
    """The good images in ADE20K's layout (ROOT/images, ROOT/annotations with an all-unlabelled mask each, a
    classes.txt of two classes), then ``damage(ROOT)``; the first image in index order is cat/img001.png."""
    root = t / "seg"
    shutil.copytree(w.images, root / "images")
    for img in sorted((root / "images").rglob("*.png")):
        mask = root / "annotations" / img.relative_to(root / "images")
        mask.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(img) as im:
            Image.fromarray(np.zeros(im.size[::-1], np.uint8)).save(mask)
    write(root / "classes.txt", "sky\nroad\n")
    damage(root)
    return Call(w.activations(dump_to=t / "acts")[:-3] + ["data:seg-folder-dataset", "--data.root", str(root)])


def save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask).save(path)


FIRST_MASK = "annotations/cat/img001.png"

ROWS = [
    # -- recording ---------------------------------------------------------------------------------------------
    row(
        "rec-dump-to-is-a-file", lambda w, t, m: Call(w.activations(dump_to=write(t / "f", "x"))), "--dump-to", "{t}/f"
    ),
    row(
        "rec-dump-to-under-a-file",
        lambda w, t, m: Call(w.activations(dump_to=write(t / "f", "x") / "acts")),
        "--dump-to",
        "{t}/f",
    ),
    row(
        "rec-dump-to-read-only",
        lambda w, t, m: Call(w.activations(dump_to=read_only_folder(t / "ro", m) / "acts")),
        "--dump-to",
        "{t}/ro",
    ),
    row("rec-dump-to-disk-full", lambda w, t, m: Call(w.activations(dump_to=full_disk(t / "full", m))), "{t}/full"),
    row(
        "rec-dump-to-unknown-protocol",
        lambda w, t, m: Call(w.activations(dump_to="nosuch://bucket/acts")),
        "--dump-to",
        "nosuch",
    ),
    row(
        "rec-dump-to-s3-without-s3fs",
        lambda w, t, m: Call(w.activations(dump_to="s3://bucket/acts"), BLOCK_S3FS),
        "--dump-to",
        "s3fs",
    ),
    row(
        "rec-vit-ckpt-pickled-object",
        lambda w, t, m: Call(w.activations("--vit-ckpt", f"saev-tiny-clip/{pickled_object(t / 'vit.pt')}")),
        "{t}/vit.pt",
        "Python objects other than tensors",
        "state dict of tensors",
    ),
    row(
        "rec-vit-ckpt-truncated",
        lambda w, t, m: Call(
            w.activations(
                "--vit-ckpt",
                f"saev-tiny-clip/{write(t / 'vit.pt', Path(w.vit_ckpt.split('/', 1)[1]).read_bytes()[:5000])}",
            )
        ),
        "{t}/vit.pt",
        "saev-tiny-clip",
    ),
    row("rec-negative-workers", lambda w, t, m: Call(w.activations("--n-workers", "-1")), "--n-workers -1"),
    row("rec-zero-batch", lambda w, t, m: Call(w.activations("--vit-batch-size", "0")), "--vit-batch-size 0"),
    row(
        "rec-zero-patches-per-shard",
        lambda w, t, m: Call(w.activations("--n-patches-per-shard", "0")),
        "--n-patches-per-shard 0",
    ),
    row("rec-zero-images", lambda w, t, m: Call(w.activations("--n-imgs", "0")), "--n-imgs 0"),
    row(  # README: the command's flags may come after the data: subcommand too
        "rec-zero-images-after-the-subcommand",
        lambda w, t, m: Call([*w.activations(), "--n-imgs", "0"]),
        "--n-imgs 0",
    ),
    row("rec-zero-d-vit", lambda w, t, m: Call(w.activations("--d-vit", "0")), "--d-vit 0"),
    row(
        "rec-blocks-beyond-memory",
        lambda w, t, m: Call(w.activations(), TINY_MEMORY),
        "--n-patches-per-shard 200",
        "need about",
        "available",
    ),
    row("rec-negative-seed", lambda w, t, m: Call(w.activations("--seed", "-1")), "--seed -1"),
    row("rec-unlistable-subfolder", lambda w, t, m: unlistable_subfolder(w, t), "{t}/imgs/locked", "--data.skip-bad"),
    row("rec-non-utf8-name", lambda w, t, m: non_utf8_name(w, t), "caf\\xe9.png", "UTF-8"),
    row(
        "rec-undecodable-image-in-the-first-block",
        lambda w, t, m: undecodable_image(w, t),
        "cat/bad.png",
        "--data.skip-bad",
    ),
    row("rec-missing-image-folder", lambda w, t, m: Call(w.activations()[:-1] + [str(t / "nowhere")]), "{t}/nowhere"),
    row(
        "rec-seg-missing-mask",
        lambda w, t, m: seg_folder(w, t, lambda root: (root / FIRST_MASK).unlink()),
        "{t}/seg/" + FIRST_MASK,
        "--data.skip-bad",
    ),
    row(
        "rec-seg-mask-size-mismatch",
        lambda w, t, m: seg_folder(w, t, lambda root: save_mask(root / FIRST_MASK, np.zeros((48, 48), np.uint8))),
        "{t}/seg/" + FIRST_MASK,
        "48x48",
        "64x48",
    ),
    row(
        "rec-seg-class-out-of-range",
        lambda w, t, m: seg_folder(w, t, lambda root: save_mask(root / FIRST_MASK, np.full((48, 64), 3, np.uint8))),
        "{t}/seg/" + FIRST_MASK,
        "class 3",
        "{t}/seg/classes.txt",
    ),
    row(
        "rec-seg-mask-not-8-bit",
        lambda w, t, m: seg_folder(w, t, lambda root: save_mask(root / FIRST_MASK, np.zeros((48, 64, 3), np.uint8))),
        "{t}/seg/" + FIRST_MASK,
        "8-bit",
    ),
    row(
        "rec-seg-no-annotations-folder",
        lambda w, t, m: seg_folder(w, t, lambda root: shutil.rmtree(root / "annotations")),
        "{t}/seg",
        "annotations/",
    ),
    row(
        "rec-seg-empty-class-name",
        lambda w, t, m: seg_folder(w, t, lambda root: write(root / "classes.txt", "sky\n\nroad\n")),
        "{t}/seg/classes.txt",
        "line 2",
    ),
    # -- training ----------------------------------------------------------------------------------------------
    row("train-zero-lr", lambda w, t, m: Call(w.train("--lr", "0", ckpt_path=t / "c")), "--lr 0.0"),
    row("train-nan-lr", lambda w, t, m: Call(w.train("--lr", "nan", ckpt_path=t / "c")), "--lr nan"),
    row("train-negative-lr", lambda w, t, m: Call(w.train("--lr", "-1e-3", ckpt_path=t / "c")), "--lr -0.001"),
    row(
        "train-zero-batch",
        lambda w, t, m: Call(w.train("--sae-batch-size", "0", ckpt_path=t / "c")),
        "--sae-batch-size 0",
    ),
    row("train-zero-patches", lambda w, t, m: Call(w.train("--n-patches", "0", ckpt_path=t / "c")), "--n-patches 0"),
    row("train-zero-threads", lambda w, t, m: Call(w.train("--n-threads", "0", ckpt_path=t / "c")), "--n-threads 0"),
    row(
        "train-zero-buffer",
        lambda w, t, m: Call(w.train("--data.buffer-chunks", "0", ckpt_path=t / "c")),
        "--data.buffer-chunks 0",
    ),
    row(
        "train-val-frac-above-one",
        lambda w, t, m: Call(w.train("--data.val-frac", "1.5", ckpt_path=t / "c")),
        "--data.val-frac 1.5",
    ),
    row("train-zero-k", lambda w, t, m: Call(w.train("--sae.k", "0", ckpt_path=t / "c")), "--sae.k 0"),
    row(
        "train-zero-ckpt-every", lambda w, t, m: Call(w.train("--ckpt-every", "0", ckpt_path=t / "c")), "--ckpt-every 0"
    ),
    row(
        "train-inf-grad-norm",
        lambda w, t, m: Call(w.train("--max-grad-norm", "inf", ckpt_path=t / "c")),
        "--max-grad-norm inf",
    ),
    row(
        "train-shard-root-is-an-array",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c", shard_root=w.store + "/layer_-1")),
        "{w.store}/layer_-1",
        named=lambda w, t: [f"{w.store}/layer_-1", f"pass the store itself: {w.store}"],
    ),
    row(
        "train-shard-root-is-the-dump-folder",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c", shard_root=os.path.dirname(w.store))),
        named=lambda w, t: [os.path.dirname(w.store), w.store],
    ),
    row(
        "train-shard-root-unknown-protocol",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c", shard_root="nosuch://x")),
        "nosuch://x",
    ),
    row(
        "train-shard-root-s3-without-s3fs",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c", shard_root="s3://bucket/acts/k"), BLOCK_S3FS),
        "s3://bucket/acts/k",
        "s3fs",
    ),
    row(
        "train-ckpt-path-is-a-file",
        lambda w, t, m: Call(w.train(ckpt_path=write(t / "f", "x"))),
        "--ckpt-path",
        "{t}/f",
    ),
    row(
        "train-ckpt-path-under-a-file",
        lambda w, t, m: Call(w.train(ckpt_path=write(t / "f", "x") / "c")),
        "--ckpt-path",
        "{t}/f",
    ),
    row(
        "train-ckpt-path-read-only",
        lambda w, t, m: Call(w.train(ckpt_path=read_only_folder(t / "ro", m))),
        "--ckpt-path",
        "{t}/ro",
    ),
    row(
        "train-ckpt-disk-full-inside-torch-save",
        lambda w, t, m: Call(w.train(ckpt_path=full_disk(t / "full", m))),
        "{t}/full",
        "disk",
    ),
    row(
        "train-resume-truncated-state",
        lambda w, t, m: damaged_resume(w, t, lambda c: write(state_file(c), state_file(c).read_bytes()[:300])),
        named=lambda w, t: [str(state_file(t / "ckpts")), "delete", str(pointer_file(t / "ckpts"))],
    ),
    row(
        "train-resume-foreign-state",
        lambda w, t, m: damaged_resume(w, t, lambda c: shutil.copy(w.ckpt, state_file(c))),
        named=lambda w, t: [str(state_file(t / "ckpts")), "delete"],
    ),
    row(
        "train-resume-state-of-another-member",
        lambda w, t, m: damaged_resume(
            w,
            t,
            lambda c: torch.save(
                {**torch.load(state_file(c), weights_only=True), "member_id": "0123456789ab"}, state_file(c)
            ),
        ),
        named=lambda w, t: [str(state_file(t / "ckpts")), "0123456789ab"],
    ),
    row(
        "train-resume-cut-pointer-no-states",
        lambda w, t, m: damaged_resume(w, t, cut_pointer_and_states),
        named=lambda w, t: [str(pointer_file(t / "ckpts")), "delete"],
    ),
    row(
        "train-nan-in-heldout-image",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c", shard_root=poisoned_heldout_store(w, t))),
        named=lambda w, t: [str(t / "acts"), "held-out", "NaN"],
    ),
    row(
        "train-width-beyond-memory",
        lambda w, t, m: Call(w.train("--sae.exp-factor", "1000000", ckpt_path=t / "c")),
        "--sae.exp-factor",
        "width 64000000",
        "available",
    ),
    row(
        "train-batch-beyond-memory",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c"), TINY_MEMORY),
        "--sae-batch-size 64",
        "need about",
        "available",
    ),
    row(
        "train-huge-value-in-the-data",
        lambda w, t, m: Call(w.train(ckpt_path=t / "c", shard_root=huge_value_store(w, t))),
        named=lambda w, t: [str(t / "acts"), "huge values", "3e+38", "not the learning rate"],
    ),
    row(
        "train-sweep-unknown-key",
        lambda w, t, m: Call(w.train("--sweep", str(write(t / "s.toml", "[sae]\nkk = [1, 2]\n")), ckpt_path=t / "c")),
        "{t}/s.toml",
        "kk",
    ),
    row(
        "train-sweep-out-of-range",
        lambda w, t, m: Call(w.train("--sweep", str(write(t / "s.toml", "lr = [1e-3, -1.0]\n")), ckpt_path=t / "c")),
        "--lr -1.0",
    ),
    # -- pipeline files ----------------------------------------------------------------------------------------
    row(
        "pipe-random-vit-string",
        lambda w, t, m: pipeline_file(w, t, lambda s: s + '\n[demo]\nrandom_vit = "false"\n'),
        "{t}/p.toml",
        "random_vit",
    ),
    row(
        "pipe-demo-unknown-key",
        lambda w, t, m: pipeline_file(w, t, lambda s: s + "\n[demo]\nrandom_vitt = true\n"),
        "{t}/p.toml",
        "random_vitt",
    ),
    row(
        "pipe-train-sweep-key",
        lambda w, t, m: pipeline_file(w, t, lambda s: replace_table(s, "train", 'sweep = "s"')),
        "{t}/p.toml",
        "train.sweep",
    ),
    row(
        "pipe-sweep-unknown-key",
        lambda w, t, m: pipeline_file(w, t, lambda s: s.replace("lr = [1e-3, 3e-3]", "lrr = [1e-3]")),
        "{t}/p.toml",
        "lrr",
    ),
    row(
        "pipe-negative-lr",
        lambda w, t, m: pipeline_file(w, t, lambda s: s.replace("lr = 1e-3\n", "lr = -1.0\n", 1)),
        "{t}/p.toml",
        "[train]",
        "lr",
    ),
    row(
        "pipe-negative-workers",
        lambda w, t, m: pipeline_file(w, t, lambda s: s.replace("n_workers = 0", "n_workers = -2")),
        "{t}/p.toml",
        "n_workers",
    ),
    row(
        "pipe-unknown-table",
        lambda w, t, m: pipeline_file(w, t, lambda s: s + "\n[trian]\nlr = 1\n"),
        "{t}/p.toml",
        "[trian]",
    ),
    row(
        "pipe-dump-to-is-a-file",
        lambda w, t, m: (write(t / "acts", "x"), pipeline_file(w, t, lambda s: s))[1],
        "{t}/p.toml",
        "dump_to",
        "{t}/acts",
    ),
    row(
        "pipe-random-weights-folder-under-a-file",
        lambda w, t, m: random_weights_at(w, t, write(t / "f", "x") / "w.pt"),
        "random_vit",
        "{t}/f",
    ),
    row(
        "pipe-random-weights-disk-full",
        lambda w, t, m: random_weights_at(w, t, full_disk(t / "full", m) / "w.pt"),
        "{t}/full/w.pt",
        "disk",
    ),
    row(
        "pipe-no-activations-table",
        lambda w, t, m: pipeline_file(w, t, lambda s: s[: s.index("[activations]")] + s[s.index("[train]") :]),
        "{t}/p.toml",
        "[activations]",
    ),
    row(
        "pipe-observe-cron-not-cron",
        lambda w, t, m: pipeline_file(w, t, lambda s: s + '\n[automation]\nobserve_cron = "every 5 minutes"\n'),
        "{t}/p.toml",
        "automation.observe_cron",
        "every 5 minutes",
    ),
    row(
        "pipe-watch-folder-missing",
        lambda w, t, m: pipeline_file(w, t, lambda s: s + f'\n[watch]\nfolder = "{t / "nowhere"}"\n'),
        "{t}/p.toml",
        "watch.folder",
        "{t}/nowhere",
    ),
    # -- checkpoint loading (visuals) ---------------------------------------------------------------------------
    row(
        "ckpt-header-sizes-absurd",
        lambda w, t, m: Call(
            w.visuals(sae_file(t, with_cfg(w, d_vit=10_000_000, exp_factor=1_000_000), good_state(w)), dump_to=t / "v")
        ),
        "{t}/bad/sae.pt",
        "d_vit=10000000",
    ),
    row(
        "ckpt-header-size-disagrees",
        lambda w, t, m: Call(w.visuals(sae_file(t, with_cfg(w, exp_factor=4), good_state(w)), dump_to=t / "v")),
        "{t}/bad/sae.pt",
        "W_enc",
    ),
    row(
        "ckpt-header-arch-not-a-string",
        lambda w, t, m: Call(w.visuals(sae_file(t, with_cfg(w, arch=5), good_state(w)), dump_to=t / "v")),
        "{t}/bad/sae.pt",
        "cfg.arch",
    ),
    row(
        "ckpt-header-k-a-string",
        lambda w, t, m: Call(w.visuals(sae_file(t, with_cfg(w, k="4"), good_state(w)), dump_to=t / "v")),
        "{t}/bad/sae.pt",
        "cfg.k",
    ),
    row(
        "ckpt-header-negative-d-vit",
        lambda w, t, m: Call(w.visuals(sae_file(t, with_cfg(w, d_vit=-64), good_state(w)), dump_to=t / "v")),
        "{t}/bad/sae.pt",
        "d_vit=-64",
    ),
    row(
        "ckpt-header-provenance-a-string",
        lambda w, t, m: Call(
            w.visuals(sae_file(t, {**good_header(w), "provenance": "x"}, good_state(w)), dump_to=t / "v")
        ),
        "{t}/bad/sae.pt",
        "provenance",
    ),
    row(
        "ckpt-pickled-object",
        lambda w, t, m: Call(w.visuals(sae_file(t, good_header(w), {"W_enc": Path("x")}), dump_to=t / "v")),
        "{t}/bad/sae.pt",
        "tensors only",
    ),
    row(
        "ckpt-truncated",
        lambda w, t, m: Call(w.visuals(sae_file(t, raw=Path(w.ckpt).read_bytes()[:2000]), dump_to=t / "v")),
        "{t}/bad/sae.pt",
        "cut short",
    ),
    row("ckpt-empty", lambda w, t, m: Call(w.visuals(sae_file(t, raw=b""), dump_to=t / "v")), "{t}/bad/sae.pt"),
    row(
        "vis-dump-to-is-a-file",
        lambda w, t, m: Call(w.visuals(w.ckpt, dump_to=write(t / "f", "x"))),
        "--dump-to",
        "{t}/f",
    ),
    row(
        "vis-dump-to-read-only",
        lambda w, t, m: Call(w.visuals(w.ckpt, dump_to=read_only_folder(t / "ro", m))),
        "--dump-to",
        "{t}/ro",
    ),
    row("vis-zero-top-k", lambda w, t, m: Call(w.visuals(w.ckpt, "--top-k", "0", dump_to=t / "v")), "--top-k 0"),
    row(
        "vis-top-k-beyond-the-images",
        lambda w, t, m: Call(w.visuals(w.ckpt, "--top-k", "100000", dump_to=t / "v")),
        "--top-k 100000",
        "8 usable images",
    ),
    row(
        "vis-top-k-not-a-whole-number",
        lambda w, t, m: Call(w.visuals(w.ckpt, "--top-k", "1e9", dump_to=t / "v")),
        "--top-k",
        "'1e9'",
    ),
    row(
        "vis-top-k-beyond-memory",
        lambda w, t, m: Call(w.visuals(w.ckpt, "--top-k", "8", dump_to=t / "v"), TINY_MEMORY),
        "--top-k 8",
        "need about",
        "available",
    ),
    row(
        "vis-device-not-a-choice",
        lambda w, t, m: Call(w.visuals(w.ckpt, dump_to=t / "v")[:-2] + ["--device", "gpu"]),
        "--device 'gpu'",
        "cpu",
    ),
    row(
        "vis-layer-the-sae-was-not-trained-on",
        lambda w, t, m: Call(w.visuals(trained_on_layer_0(w, t), "--data.layer", "-1", dump_to=t / "v")),
        "--data.layer -1",
        "(layer 0)",
        "--allow-layer-mismatch",
    ),
    row(
        "vis-infinite-range",
        lambda w, t, m: Call(w.visuals(w.ckpt, "--log-freq-range", "-6", "inf", dump_to=t / "v")),
        "--log-freq-range",
    ),
    row(
        "vis-evaluate-zero-batch",
        lambda w, t, m: Call(["evaluate", "--ckpt", str(w.ckpt), "--batch-size", "0"]),
        "--batch-size 0",
    ),
    row(
        "vis-explore-port-out-of-range",
        lambda w, t, m: Call(["explore", "--visuals", str(t), "--port", "70000"]),
        "--port 70000",
    ),
    row("ckpt-evaluate-missing-file", lambda w, t, m: Call(["evaluate", "--ckpt", str(t / "none.pt")]), "{t}/none.pt"),
    row(
        "vis-probe-store-without-patch-labels",
        lambda w, t, m: Call(["probe", "--ckpt", str(w.ckpt), "--dump-to", str(t / "p"), "--device", "cpu"]),
        "{w.store}",
        "data:seg-folder-dataset",
    ),
    row("vis-probe-zero-k", lambda w, t, m: Call(["probe", "--ckpt", str(w.ckpt), "--k", "0"]), "--k 0"),
    row("vis-probe-tau-above-1", lambda w, t, m: Call(["probe", "--ckpt", str(w.ckpt), "--tau", "2"]), "--tau 2"),
]
# The pickled-object row: torch's own message would say "weights_only ... will likely succeed"; it must not show.


def run_cli(call: Call, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env = {k: v for k, v in {**env, **call.env}.items() if v is not None}
    if call.patch:
        code = f"{call.patch}\nimport sys\nfrom saev_core.__main__ import main\nsys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, *call.argv]
    else:
        cmd = [sys.executable, "-m", "saev_core", *call.argv]
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_the_table_covers_every_area_and_at_least_40_inputs():
    areas = {r.id.split("-")[0] for r in ROWS}
    assert len(ROWS) >= 40 and areas == {"rec", "train", "pipe", "ckpt", "vis"}
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("bad", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_exits_2_with_one_clear_line_and_harms_nothing(bad: Row, world: World, tmp_path, mounts):
    before = tree_hashes(world.store, os.path.dirname(world.ckpt))
    call = bad.make(world, tmp_path, mounts)
    result = run_cli(call, tmp_path)
    err = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "will likely succeed" not in err and "weights_only" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    if os.environ.get("SAEV_SHOW_ERRORS"):
        print(f"\n{bad.id}: {line}")
    for name in bad.names(world, tmp_path):
        assert name in line, f"{name!r} not named in: {line}"
    assert tree_hashes(world.store, os.path.dirname(world.ckpt)) == before
    if bad.id.startswith("rec-"):  # a recording refused before its first block leaves no store behind
        assert not os.path.exists(tmp_path / "acts") or os.listdir(tmp_path / "acts") == []


def test_allow_layer_mismatch_renders_the_layer_the_sae_was_not_trained_on(world: World, tmp_path):
    argv = world.visuals(trained_on_layer_0(world, tmp_path), "--data.layer", "-1", dump_to=tmp_path / "v")
    result = run_cli(Call([*argv, "--allow-layer-mismatch", "--top-k", "4", "--n-imgs-per-latent", "1"]), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "v" / "index.html")


# ----------------------------------------------------------------------------------------------------------------
# Crashes: the rerun removes what the interrupted write left
# ----------------------------------------------------------------------------------------------------------------

KILL_IN_SHARD_WRITE = textwrap.dedent("""
    import os, signal
    from saev_core.store import shards
    _write_all = shards._write_all
    def write_then_die(fd, pieces):
        os.write(fd, bytes(pieces[0][:100]))  # part of the shard is on disk, in its temporary file
        os.kill(os.getpid(), signal.SIGKILL)
    shards._write_all = write_then_die
""")

KILL_IN_ATOMIC_WRITE = textwrap.dedent("""
    import os, signal, torch
    from saev_core.train import resume
    _save = torch.save
    def save_then_die(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:  # a train_state file
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(obj, f, *args, **kwargs)
    resume.torch.save = save_then_die  # the train_state writer's torch.save
""")


def test_recording_killed_mid_write_leaves_a_partial_shard_that_the_rerun_removes(world: World, tmp_path):
    argv = world.activations(dump_to=tmp_path / "acts")
    killed = run_cli(Call(argv, KILL_IN_SHARD_WRITE), tmp_path)
    assert killed.returncode == -9
    [store] = glob.glob(str(tmp_path / "acts" / "*"))
    assert glob.glob(f"{store}/**/*.partial", recursive=True), "the kill should leave a temporary shard"

    rerun = run_cli(Call(argv), tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.strip().splitlines()[-1] == store
    leftovers = [p for p in glob.glob(f"{store}/**/*", recursive=True) if p.endswith((".partial", ".tmp"))]
    assert leftovers == []
    # The resumed store holds the same arrays as the good one, recorded in one go from the same inputs.
    same = {os.path.relpath(p, store): h for p, h in tree_hashes(f"{store}/layer_{LAYER}").items()}
    good = {os.path.relpath(p, world.store): h for p, h in tree_hashes(f"{world.store}/layer_{LAYER}").items()}
    assert same == good


def test_training_killed_inside_a_checkpoint_write_leaves_a_temporary_that_the_rerun_removes(world: World, tmp_path):
    argv = world.train("--ckpt-every", "4", ckpt_path=tmp_path / "c")
    killed = run_cli(Call(argv, KILL_IN_ATOMIC_WRITE), tmp_path)
    assert killed.returncode == -9
    assert glob.glob(str(tmp_path / "c" / "*" / ".train_state-4.pt-*.tmp")), "the kill should leave a temporary"

    rerun = run_cli(Call(argv), tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert glob.glob(str(tmp_path / "c" / "**" / "*.tmp"), recursive=True) == []
    assert glob.glob(str(tmp_path / "c" / ".*.tmp")) == []


def test_a_cut_group_pointer_falls_back_to_the_state_files_and_finishes(world: World, tmp_path):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(world.interrupted, ckpts)
    write(pointer_file(ckpts), '{"step": 1')  # a crash or an editor cut it; train_state-12.pt files are whole
    result = run_cli(Call(world.train("--ckpt-every", "4", ckpt_path=ckpts)), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step 12" in result.stderr
    resumed = Path(glob.glob(str(ckpts / "*" / "sae.pt"))[0]).read_bytes()
    # Resuming from step 12 of the same run gives the uninterrupted weights, so the same file as the good one's
    # (up to the checkpoint path in its provenance, which is not in the file).
    assert resumed == Path(world.ckpt).read_bytes()


def test_fifo_named_like_an_image_is_warned_once_and_skipped_without_hanging(world: World, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(world.images, images)
    os.mkfifo(images / "cat" / "pipe.png")
    argv = world.activations(dump_to=tmp_path / "acts")
    result = run_cli(Call(argv[:-1] + [str(images)]), tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("cat/pipe.png") == 1 and "not regular files" in result.stderr


def test_skip_bad_turns_unlistable_folders_and_non_utf8_names_into_one_warning(tmp_path, monkeypatch):
    from saev_core.record import images

    write(tmp_path / "a" / "x.png", b"")
    write(tmp_path / "locked" / "y.png", b"")
    with open(os.path.join(os.fsencode(tmp_path), b"a", b"caf\xe9.png"), "wb"):
        pass
    scandir = os.scandir

    def unlistable(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unlistable)
    with pytest.warns(images.IgnoredFilesWarning) as caught:
        found, _ = images.list_image_files(str(tmp_path), skip_bad=True)
    assert found == ["a/x.png"]
    [warning] = [str(w.message) for w in caught if "skip-bad" in str(w.message)]
    assert f"{tmp_path}/locked" in warning and "b'a/caf\\xe9.png'" in warning


def test_ctrl_c_ends_in_one_line_saying_what_is_kept(world: World, tmp_path):
    """SIGINT (Ctrl-C) during training through the real CLI: exit 130, one line naming what is kept and how to go on,
    no traceback; the checkpoint written before it is on disk for the rerun."""
    ckpt_path = tmp_path / "ckpts"
    argv = world.train("--n-patches", "2000000", "--ckpt-every", "2", ckpt_path=ckpt_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "saev_core", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while not glob.glob(str(ckpt_path / "*" / "train_state-*.pt")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the interrupt"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "checkpoint" in last and "run the same command again" in last
    assert glob.glob(str(ckpt_path / "*" / "train_state-*.pt"))


# ----------------------------------------------------------------------------------------------------------------
# Object storage: one line within a bounded time (a local moto server, a closed port, a socket that never answers)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    """A moto S3 server on a free loopback port with the bucket ``acts``; yields its URL."""
    with moto_server("acts") as url:
        yield url


@pytest.fixture(scope="module")
def silent_endpoint():
    """A loopback socket that accepts every connection and never sends a byte; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []

    def accept():
        with contextlib.suppress(OSError):
            while True:
                held.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for conn in held:
        conn.close()


def s3_env(endpoint: str, credentials: bool = True, **extra) -> dict:
    """Only what the test sets: no AWS files, no instance metadata lookup (no network), the given endpoint."""
    env = {k: None for k in os.environ if k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE="/dev/null",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        **extra,
    )
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    return env


STORAGE_CASES = {
    # case: (endpoint kind, credentials, bucket, what the line must say)
    "no-credentials": ("moto", False, "acts", ["no object-storage credentials", "AWS_ACCESS_KEY_ID"]),
    "missing-bucket": ("moto", True, "nobucket", ["bucket 'nobucket' does not exist", "Create it"]),
    "refused-endpoint": ("closed", True, "acts", ["cannot connect to http://127.0.0.1:", "AWS_ENDPOINT_URL"]),
    "silent-endpoint": ("silent", True, "acts", ["did not answer within", "SAEV_STORAGE_TIMEOUT"]),
}


@pytest.mark.parametrize("command", ["activations", "train"])
@pytest.mark.parametrize("case", list(STORAGE_CASES))
def test_object_storage_fails_in_one_line_naming_the_url_and_the_fix(
    case, command, world: World, tmp_path, moto, silent_endpoint
):
    kind, credentials, bucket, said = STORAGE_CASES[case]
    endpoint = {"moto": moto, "silent": silent_endpoint, "closed": f"http://127.0.0.1:{free_port()}"}[kind]
    url = f"s3://{bucket}/acts"
    if command == "activations":
        argv, flag = world.activations(dump_to=url), "--dump-to"
    else:
        argv, flag = world.train(ckpt_path=tmp_path / "c", shard_root=f"{url}/store"), "The activation store"
        url = f"{url}/store"
    # The defaults bound the silent endpoint's wait (about 20 s); the train rows show the variables are read.
    env = s3_env(endpoint, credentials, **({"SAEV_STORAGE_TIMEOUT": "1"} if command == "train" else {}))
    result = run_cli(Call(argv, env=env), tmp_path, timeout=120)
    err = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    for name in [flag, url, *said]:
        assert name in line, f"{name!r} not named in: {line}"
    if kind != "moto":
        assert endpoint in line
