"""Our CLI vs saev 0.1.0 on the same small job: record activations, train one SAE, render top-k visuals.

    .venv/bin/python benchmarks/bench_vs_saev.py [--saev-path /tmp/saev01] [--images DIR] [--repeats 1]
        [--n-patches 60000] [--top-k 32] [--n-latents 64] [--keep DIR] [--defaults]

saev 0.1.0 is not a dependency of this project. Install it, without its heavy dependencies, into a folder of its
own (this venv already has torch, torchvision, open_clip, tyro, beartype, jaxtyping, matplotlib; the rest is about
21 MB of wheels, 20 of them wandb, which saev's training module imports; it runs disabled with ``--no-track``):

    .venv/bin/python -m pip install --no-deps --target /tmp/saev01 saev==0.1.0 einops==0.8.2 submitit==1.5.4 \\
        wandb==0.31.0 opentelemetry-api==1.45.2 xxhash==4.1.0

Each stage is one command-line run (a subprocess, timed wall-clock from start to exit, Python start-up and imports
included, as a user sees it), the two programs alternating stage by stage, every run into a fresh folder (so
nothing is resumed or reused). saev runs as ``python -m saev`` with ``PYTHONPATH`` = ``--saev-path``, from the
folder holding the ViT weights (see below). The job, the same for both:

- images: ``--images`` (default: the embedded set, 336 PNG crops in one sub-folder per photograph), read as an
  image folder (class = sub-folder). The folder must hold image files only (saev counts every file as an image).
- activations: open_clip ViT-B-32 with random weights (``saev_core.record.vit.save_random_weights``; no download), layer
  -2 with the CLS token, 49 patches, d_vit 768, ``--vit-batch-size`` images per forward, ``--n-workers``
  decoding workers, ``--n-patches-per-shard`` (default: all images in one shard), float32, CPU.
- train: one ``relu`` SAE (saev 0.1.0's recipe: L1 4e-4, unit-norm decoder rows, parallel-gradient removal),
  exp factor ``--exp-factor``, ``--n-patches`` patch vectors in batches of ``--sae-batch-size``, lr ``--lr`` with
  ``--n-lr-warmup`` warm-up steps, mean and norm scaling on; saev with ``--no-track`` (wandb disabled) and
  ``--train-workers`` DataLoader workers. Ours also holds out 10% of the images and evaluates on them; saev
  evaluates on all patches.
- visuals: token mode patches (rank by best patch), ``--top-k`` images per latent, ``--n-latents`` latents drawn
  among those with log10 frequency in [-10, 1] and log10 mean value in [-10, 10] (wide: a briefly trained relu
  SAE on a random ViT fires often). Ours renders all ``--top-k`` images of each latent (``--n-imgs-per-latent`` =
  ``--top-k``); saev renders the distinct images among its top-k (its top-k may repeat an image).

Loading a local ViT checkpoint in saev 0.1.0: its ``--vit-ckpt`` is split with ``str.split("/")`` into exactly
two parts, then passed to ``open_clip.create_model_from_pretrained(arch, pretrained=...)``, which loads an
existing file path. So ``--vit-ckpt ViT-B-32/<file name>`` works when run from the file's folder; a path with a
'/' in it raises ``ValueError: too many values to unpack``.

Thread counts: neither program is given one. saev 0.1.0 never sets torch's threads (torch's default, one per
core); ours picks its own (``saev_core.threads``, docs/training.md). ``--defaults`` also leaves the worker counts and
the ViT batch to each program's defaults (saev 0.1.0: 8 decoding workers and ViT batches of 1,024 for activations,
32 DataLoader workers for training, 16 for visuals; ours: 2 workers and batches of 256), so the figures are each
program as shipped; without it both get the same ``--n-workers``, ``--train-workers`` (saev only) and
``--vit-batch-size``. The job (images, layer, SAE, patches, batch, lr, top-k) is the same in both modes.

Known differences in what each does (the figures are for each program's own way of doing the job): saev's
activations stage builds the ViT twice (once more for its preprocessing); its training and visuals compute the
normalisation from per-vector reads (a memory map opened per vector) in every stage (train, its evaluation, and
visuals); its top-k pass drops the last partial batch of ``--topk-batch-size`` patches (default 16384, so with
336 images it ranks 334), updates a percentile estimate once per patch in Python, and plots 25 latents' value
distributions (300 dpi, with more per-value Python loops); it renders 448 x 448 RGBA PNGs of the image squashed
to 512 x 512 and centre-cropped, where ours renders the original image at 224 px shortest side; ours writes a
gallery page too.
"""

import argparse
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from saev_core import config
from saev_core.record import (
    embedded,  # noqa: E402
    vit,  # noqa: E402
)

STAGES = ("activations", "train", "visuals")
WIDE = ["--log-freq-range", "-10", "1", "--log-value-range", "-10", "10"]


def run(argv: list[str], cwd: str, env: dict | None = None) -> tuple[float, str]:
    """Seconds from start to exit, and stdout; exits with the command's stderr when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout


def tuned(args, *flags) -> list[str]:
    """Speed settings (workers, ViT batch): passed the same to both programs, or (``--defaults``) left to each."""
    return [] if args.defaults else [str(f) for f in flags]


def activations_flags(args, vit_ckpt: str, dump_to: str) -> list[str]:
    """The `activations` flags, the same for both programs (only the checkpoint string and the output differ):
    ViT-B/32's second-to-last layer on the CPU."""
    return [
        "--vit-family",
        "clip",
        "--vit-ckpt",
        vit_ckpt,
        "--d-vit",
        "768",
        "--n-patches-per-img",
        "49",
        "--vit-layers",
        "-2",
        "--dump-to",
        dump_to,
        *tuned(args, "--vit-batch-size", args.vit_batch_size, "--n-workers", args.n_workers),
        "--n-patches-per-shard",
        str(args.n_patches_per_shard),
        "--device",
        "cpu",
        "data:image-folder-dataset",
        "--data.root",
        args.images,
    ]


def train_flags(args, store: str) -> list[str]:
    """The `train` flags both programs get: the same data, SAE size and schedule, logging every 10 steps, on the CPU
    (each adds its own: ours the relu architecture, saev its data-loading workers and no wandb)."""
    return [
        "--data.shard-root",
        store,
        "--data.layer",
        "-2",
        "--data.patches",
        "patches",
        "--sae.d-vit",
        "768",
        "--sae.exp-factor",
        str(args.exp_factor),
        "--n-patches",
        str(args.n_patches),
        "--sae-batch-size",
        str(args.sae_batch_size),
        "--lr",
        str(args.lr),
        "--n-lr-warmup",
        str(args.n_lr_warmup),
        "--log-every",
        "10",
        "--device",
        "cpu",
    ]


def ours(args, stage: str, work: str, state: dict) -> float:
    cmd = [sys.executable, "-m", "saev_core", stage]
    if stage == "activations":
        cmd += activations_flags(args, f"ViT-B-32/{args.vit_path}", os.path.join(work, "ours-acts"))
    elif stage == "train":
        cmd += [
            *train_flags(args, state["ours_store"]),
            "--sae.arch",
            "relu",
            "--ckpt-path",
            os.path.join(work, "ours-ckpt"),
        ]
    else:
        cmd += [
            "--ckpt",
            state["ours_ckpt"],
            "--dump-to",
            os.path.join(work, "ours-visuals"),
            "--top-k",
            str(args.top_k),
            "--n-imgs-per-latent",
            str(args.top_k),
            "--n-latents",
            str(args.n_latents),
            "--device",
            "cpu",
            *WIDE,
        ]
    seconds, out = run(cmd, cwd=work)
    if stage == "activations":
        state["ours_store"] = out.strip().splitlines()[-1]
    elif stage == "train":
        [state["ours_ckpt"]] = glob.glob(os.path.join(work, "ours-ckpt", "*", "sae.pt"))
    else:
        state["ours_pngs"] = len(glob.glob(os.path.join(work, "ours-visuals", "neurons", "*", "*.png")))
    return seconds


def saev(args, stage: str, work: str, state: dict) -> float:
    env = {**os.environ, "PYTHONPATH": args.saev_path}
    cmd = [sys.executable, "-m", "saev", stage]
    if stage == "activations":
        cmd += activations_flags(args, f"ViT-B-32/{os.path.basename(args.vit_path)}", os.path.join(work, "saev-acts"))
    elif stage == "train":
        cmd += [
            *train_flags(args, state["saev_acts"]),
            *tuned(args, "--n-workers", args.train_workers),
            "--no-track",
            "--ckpt-path",
            os.path.join(work, "saev-ckpt"),
            "--log-to",
            os.path.join(work, "saev-logs"),
        ]
    else:
        cmd += [
            "--ckpt",
            state["saev_ckpt"],
            "--data.shard-root",
            state["saev_acts"],
            "--data.layer",
            "-2",
            "--data.patches",
            "patches",
            "--sort-by",
            "patch",
            "--top-k",
            str(args.top_k),
            "--n-latents",
            str(args.n_latents),
            *tuned(args, "--n-workers", args.train_workers),
            "--device",
            "cpu",
            "--dump-to",
            os.path.join(work, "saev-visuals"),
            *WIDE,
            "images:image-folder-dataset",
            "--images.root",
            args.images,
        ]
    # saev reads the weights as ARCH/FILE relative to the working folder (see the docstring).
    seconds, _ = run(cmd, cwd=os.path.dirname(args.vit_path), env=env)
    if stage == "activations":
        [state["saev_acts"]] = glob.glob(os.path.join(work, "saev-acts", "*", ""))
    elif stage == "train":
        [state["saev_ckpt"]] = glob.glob(os.path.join(work, "saev-ckpt", "*", "sae.pt"))
    else:
        state["saev_pngs"] = len(
            glob.glob(os.path.join(work, "saev-visuals", "sort_by_patch", "neurons", "*", "*.png"))
        )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--saev-path",
        default=os.environ.get("SAEV01_PATH", "/tmp/saev01"),
        help="folder saev 0.1.0 was installed into with pip --target",
    )
    parser.add_argument("--images", default=None, help="image folder (default: the embedded images)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each stage (the best is kept)")
    parser.add_argument("--vit-batch-size", type=int, default=64)
    parser.add_argument("--n-workers", type=int, default=1, help="image-decoding workers (activations)")
    parser.add_argument("--n-patches-per-shard", type=int, default=16_800, help="16,800 = 336 images x 50 tokens")
    parser.add_argument("--exp-factor", type=int, default=4)
    parser.add_argument("--n-patches", type=int, default=60_000, help="training vectors")
    parser.add_argument("--sae-batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-lr-warmup", type=int, default=5)
    parser.add_argument("--train-workers", type=int, default=2, help="saev's DataLoader workers (train, visuals)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--n-latents", type=int, default=64)
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="leave the speed settings (workers, ViT batch) to each program's defaults: ours vs theirs as shipped",
    )
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    if not os.path.isfile(os.path.join(args.saev_path, "saev", "__main__.py")):
        sys.exit(f"saev 0.1.0 is not installed in {args.saev_path}; see this script's docstring.")
    work_root = args.keep or tempfile.mkdtemp(prefix="bench-vs-saev-")
    os.makedirs(work_root, exist_ok=True)
    try:
        args.images = os.path.abspath(args.images or embedded.ensure_embedded_images(config.EmbeddedDataset()))
        n_files = sum(len(files) for _, _, files in os.walk(args.images))
        args.vit_path = os.path.join(work_root, "vit_b32_random.pt")
        if not os.path.isfile(args.vit_path):
            vit.save_random_weights("clip", "ViT-B-32", args.vit_path)
        print(
            f"{n_files} images in {args.images}; ViT-B-32 random weights {args.vit_path}; {os.cpu_count()} CPUs; "
            f"saev 0.1.0 from {args.saev_path}; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )

        best = {(who, stage): float("inf") for who in ("ours", "saev") for stage in STAGES}
        state: dict = {}
        for rep in range(args.repeats):
            work = os.path.join(work_root, f"run{rep}")
            os.makedirs(work)
            for stage in STAGES:  # alternate the two programs stage by stage
                for who, fn in (("ours", ours), ("saev", saev)):
                    seconds = fn(args, stage, work, state)
                    best[who, stage] = min(best[who, stage], seconds)
                    print(f"  run {rep}: {who:4s} {stage:11s} {seconds:7.1f} s", flush=True)

        print(
            f"\n== saev_core CLI vs saev 0.1.0, {n_files} images, CPU, wall-clock per stage (best of {args.repeats}; "
            f"{'each program with its own default speed settings' if args.defaults else 'the same speed settings'}) =="
        )
        rows = [("stage", "ours s", "saev 0.1.0 s", "saev / ours")]
        for stage in STAGES:
            rows.append(
                (
                    stage,
                    f"{best['ours', stage]:.1f}",
                    f"{best['saev', stage]:.1f}",
                    f"{best['saev', stage] / best['ours', stage]:.2f}",
                )
            )
        total = {who: sum(best[who, s] for s in STAGES) for who in ("ours", "saev")}
        rows.append(
            ("all three", f"{total['ours']:.1f}", f"{total['saev']:.1f}", f"{total['saev'] / total['ours']:.2f}")
        )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        rows.insert(1, tuple("-" * w for w in widths))
        for r in rows:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        print(
            f"(heatmaps rendered: ours {state['ours_pngs']} at 224 px shortest side, saev {state['saev_pngs']} "
            f"at 448 x 448; {args.n_latents} latents, top-k {args.top_k}. saev / ours > 1: ours is faster. Load "
            f"average at the end: {os.getloadavg()[0]:.1f}.)"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    main()
