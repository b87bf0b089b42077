"""Sweep-trainer overhead, measured side by side in one run.

1. One pass training K SAEs (``train_sweep`` on a planted store on disk: loader, device copy, NaN checks, logs,
   final checkpoint, held-out evaluation) vs the same SAE steps alone on batches already in memory on the device.
   Efficiency = in-memory time / sweep time, for the training loop alone (between the first and last log
   callbacks) and end to end. Goal: loop efficiency >= 0.9. Bytes read from the store per sweep must not grow with
   K (1x the data, not Kx), and K separate runs are compared with one pass.
2. SAE math FLOP/s: one training step (forward + backward = 6 matmuls of batch x d_vit x d_sae, i.e.
   12 * batch * d_vit * d_sae FLOPs) vs a plain fp32 matmul [batch, d_vit] @ [d_vit, d_sae]. Goal: >= 0.7.
3. A shared machine (``--shared``): sweep patches/s with torch's default thread count (one per core, what training
   used before ``--n-threads``) and with ``--n-threads`` auto, on the machine as it is and with one core kept busy by
   a busy-loop process this benchmark starts (standing in for another user's job). Goal: with one core busy, auto
   keeps most of its idle speed.

    .venv/bin/python benchmarks/bench_training.py [--d-vit 256] [--exp-factor 4] [--batch-size 1024]
        [--n-steps 20] [--ks 1,2,4,8] [--arch topk] [--device auto] [--shared] [--skip-sweep] [--skip-flops]

On a GPU try: --d-vit 768 --exp-factor 16 --batch-size 16384 --n-steps 50 --n-imgs 20000 --n-tokens 49
"""

import argparse
import contextlib
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from saev_core import config, nn, threads
from saev_core.store import ActivationStore, shards, write_store
from saev_core.store.stats import normalization
from saev_core.train import fitting, trainer


class ReadCounter:
    """Counts the bytes the loader reads from the store: wraps ``shards.ChunkReader.read`` (every chunk read, the
    raw-file path and the zarr path alike, goes through it)."""

    n_bytes = 0

    def __init__(self):
        self.original = shards.ChunkReader.read

    def __enter__(self):
        original = self.original

        def read(reader, start, dest):
            original(reader, start, dest)
            ReadCounter.n_bytes += dest.nbytes

        shards.ChunkReader.read = read
        return self

    def __exit__(self, *exc):
        shards.ChunkReader.read = self.original


def plant_store(root: str, args) -> ActivationStore:
    n_imgs, n_tokens, d = args.n_imgs, args.n_tokens, args.d_vit
    rng = np.random.default_rng(0)
    return write_store(
        root,
        lambda start, end: rng.standard_normal((1, end - start, n_tokens, d), dtype=np.float32) + 1.0,
        shape=(n_imgs, n_tokens, d),
        cls_token=False,
        imgs_per_shard=2_400_000 // n_tokens,
        fingerprint=str(time.time()),
        resolved_layers=(10,),
    )


def member_cfgs(store: ActivationStore, args, k: int, ckpt: str, **kw) -> list[config.TrainConfig]:
    base = config.TrainConfig(
        data=config.DataLoadConfig(shard_root=store.path, layer=-2),
        sae=config.SparseAutoencoderConfig(d_vit=args.d_vit, exp_factor=args.exp_factor, arch=args.arch, k=32),
        n_patches=args.n_steps * args.batch_size,
        sae_batch_size=args.batch_size,
        lr=1e-4,
        n_lr_warmup=2,
        ckpt_path=ckpt,
        ckpt_every=10**9,
        log_every=10**9,
        device=args.device,
        **kw,
    )
    return [dataclasses.replace(base, sae=dataclasses.replace(base.sae, seed=i), lr=1e-4 * (1 + i)) for i in range(k)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_sweep(cfgs: list[config.TrainConfig]) -> tuple[float, float, int]:
    """(end-to-end seconds, loop seconds for steps 1..n-1, bytes read) of one train_sweep call."""
    stamps: list[float] = []
    fit = fitting.fit_to_run  # unset settings get their values first
    last = trainer.member_id(fit(cfgs[-1])[0])

    def on_log(step, mid, record):
        if mid == last:  # the last member finishes each step
            stamps.append(time.perf_counter())

    ReadCounter.n_bytes = 0
    t0 = time.perf_counter()
    trainer.train_sweep(cfgs, show_progress=False, on_log=on_log)
    return time.perf_counter() - t0, stamps[-1] - stamps[0], ReadCounter.n_bytes


def time_in_memory(cfgs: list[config.TrainConfig], batches: list[torch.Tensor], device: str) -> float:
    """Seconds for steps 1..n-1 of every member on batches already on the device (step 0 is a warm-up), with the
    CPU threads the sweep trains with."""
    fit = fitting.fit_to_run
    members = []
    for cfg in cfgs:
        cfg = fit(cfg)[0]
        sae = nn.make_sae(cfg.sae).to(device).train()
        members.append(trainer.Member(cfg, "", "", sae, torch.optim.Adam(sae.parameters(), lr=cfg.lr)))
    n = len(batches)
    outside = torch.get_num_threads()
    torch.set_num_threads(threads.tuner_for(cfgs[0].n_threads, device).threads)  # auto: where the timing starts
    try:
        for m in members:
            trainer.train_step(m, batches[0], 0, n)
        sync(device)
        t0 = time.perf_counter()
        for step in range(1, n):
            for m in members:
                trainer.train_step(m, batches[step], step, n)
        sync(device)
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(outside)


def bench_sweep(args, store: ActivationStore, tmp: str) -> None:
    device = config.resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, args.d_vit, generator=gen) + 1).to(device) for _ in range(args.n_steps)]
    ks = [int(k) for k in args.ks.split(",")]
    mem, loop, total, read, single = {}, {}, {}, {}, {}
    for rep in range(args.sweep_repeats):  # interleaved; the minimum of each is kept (this machine is shared)
        for k in ks:
            cfgs = member_cfgs(store, args, k, os.path.join(tmp, f"ckpt-k{k}-{rep}"))
            mem[k] = min(mem.get(k, math.inf), time_in_memory(cfgs, batches, device))
            t_total, t_loop, n_read = time_sweep(cfgs)
            total[k], loop[k] = min(total.get(k, math.inf), t_total), min(loop.get(k, math.inf), t_loop)
            read[k] = n_read
        for i, cfg in enumerate(member_cfgs(store, args, max(ks), "")):
            t_single = time_sweep([dataclasses.replace(cfg, ckpt_path=os.path.join(tmp, f"single{i}-{rep}"))])[0]
            single[i] = min(single.get(i, math.inf), t_single)

    consumed = args.n_steps * args.batch_size * args.d_vit * 4
    print(
        f"\n== one pass of K SAEs vs the same steps on in-memory batches ({device}; {args.n_steps} steps of "
        f"{args.batch_size} x {args.d_vit} -> d_sae {args.d_vit * args.exp_factor}, {args.arch}; "
        f"best of {args.sweep_repeats}) =="
    )
    print(
        f"{'K':>3} {'in-memory s':>12} {'sweep loop s':>13} {'loop eff':>9} {'sweep total s':>14} "
        f"{'total eff':>10} {'MB read':>8} {'read/K=1':>9}"
    )
    for k in ks:
        per_step = mem[k] / (args.n_steps - 1)
        print(
            f"{k:>3} {mem[k]:>12.3f} {loop[k]:>13.3f} {mem[k] / loop[k]:>9.2f} {total[k]:>14.3f} "
            f"{per_step * args.n_steps / total[k]:>10.2f} {read[k] / 1e6:>8.1f} {read[k] / read[ks[0]]:>9.2f}"
        )
    print(
        f"(loop: steps 1..n-1; total adds opening, the held-out evaluation and writing checkpoints. Training "
        f"consumes {consumed / 1e6:.1f} MB of vectors; MB read adds whole chunks read ahead and the held-out "
        "split, and does not grow with K)"
    )
    print("\n== K separate runs vs one pass (end to end) ==")
    print(f"{'K':>3} {'separate s':>11} {'one pass s':>11} {'speed-up':>9}")
    for k in ks:
        separate = sum(single[i] for i in range(k))
        print(f"{k:>3} {separate:>11.3f} {total[k]:>11.3f} {separate / total[k]:>9.2f}")


@contextlib.contextmanager
def busy_core(on: bool):
    """A process spinning on one core for the duration (another user's job), or nothing."""
    if not on:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it be scheduled
        yield
    finally:
        proc.kill()
        proc.wait()


def bench_shared(args, store: ActivationStore, tmp: str) -> None:
    """Sweep patches/s (loop steps 1..n-1) with torch's default threads and with auto, idle and one core busy."""
    k = max(int(k) for k in args.ks.split(","))
    default = torch.get_num_threads()  # torch's own choice: one per core; what training used before --n-threads
    settings = {f"{default} threads (torch default, before)": default, "auto (after)": None}
    rates: dict[tuple[str, str], list[float]] = {}
    for rep in range(args.shared_repeats):  # interleaved, so drift in the machine's load hits every cell
        for load in ("as is", "one core busy"):
            with busy_core(load != "as is"):
                for name, n_threads in settings.items():
                    cfgs = member_cfgs(
                        store, args, k, os.path.join(tmp, f"shared-{rep}-{load}-{n_threads}"), n_threads=n_threads
                    )
                    _, loop, _ = time_sweep(cfgs)
                    rates.setdefault((name, load), []).append((args.n_steps - 1) * args.batch_size / loop)
    print(
        f"\n== sweep of {k} SAEs on a shared machine ({args.n_steps} steps of {args.batch_size} x {args.d_vit} -> "
        f"d_sae {args.d_vit * args.exp_factor}, {args.arch}; {os.cpu_count()} CPUs, auto = timed (saev_core.threads); "
        f"median of {args.shared_repeats}; load average before: {os.getloadavg()[0]:.1f}) =="
    )
    print(f"{'threads':>34} {'as is patches/s':>16} {'one core busy':>14} {'busy / as is':>13}")
    for name in settings:
        idle, busy = (statistics.median(rates[(name, load)]) for load in ("as is", "one core busy"))
        print(f"{name:>34} {idle:>16,.0f} {busy:>14,.0f} {busy / idle:>13.2f}")


def bench_flops(args) -> None:
    device = config.resolve_device(args.device)
    b, d, s = args.batch_size, args.d_vit, args.d_vit * args.exp_factor
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(b, d, generator=gen) + 1).to(device)
    w = torch.randn(d, s, generator=gen).to(device)
    print(f"\n== SAE training-step FLOP/s vs a plain fp32 matmul [{b}, {d}] @ [{d}, {s}] ({device}) ==")
    print(f"{'arch':>10} {'step ms':>9} {'SAE GFLOP/s':>12} {'matmul ms':>10} {'matmul GFLOP/s':>15} {'ratio':>6}")
    for arch in dict.fromkeys([args.arch, "relu"]):
        sae_cfg = config.SparseAutoencoderConfig(d_vit=d, exp_factor=args.exp_factor, arch=arch, k=32)
        cfg = config.TrainConfig(sae=sae_cfg, lr=1e-4, n_lr_warmup=2)
        sae = nn.make_sae(cfg.sae).to(device).train()
        member = trainer.Member(cfg, "", "", sae, torch.optim.Adam(sae.parameters(), lr=1e-4))

        def step(member=member):
            trainer.train_step(member, x, 10, 100)

        def matmul():
            x @ w

        step_t, mm_t = [], []
        for f in (step, matmul):
            f()
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for f, out in ((step, step_t), (matmul, mm_t)):
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    f()
                sync(device)
                out.append((time.perf_counter() - t0) / args.inner)
        t_step, t_mm = min(step_t), min(mm_t)  # the least disturbed run of each (shared machine)
        sae_flops, mm_flops = 12 * b * d * s / t_step, 2 * b * d * s / t_mm
        print(
            f"{arch:>10} {t_step * 1e3:>9.2f} {sae_flops / 1e9:>12.1f} {t_mm * 1e3:>10.3f} "
            f"{mm_flops / 1e9:>15.1f} {sae_flops / mm_flops:>6.2f}"
        )
    print(
        "(a step = 6 matmuls of the matmul's size: encode, decode, and two gradients of each; plus top-k, "
        "losses, Adam and the decoder-norm hooks, which the ratio charges to the SAE)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-vit", type=int, default=256)
    parser.add_argument("--exp-factor", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n-steps", type=int, default=12)
    parser.add_argument("--n-imgs", type=int, default=400)
    parser.add_argument("--n-tokens", type=int, default=64)
    parser.add_argument("--ks", default="1,2,4,8", help="comma-separated numbers of SAEs per pass")
    parser.add_argument("--arch", default="topk", choices=list(nn.ARCHS))
    parser.add_argument("--repeats", type=int, default=5, help="FLOP/s timing repeats (minimum)")
    parser.add_argument("--sweep-repeats", type=int, default=3, help="sweep timing repeats (minimum)")
    parser.add_argument("--inner", type=int, default=5, help="calls per FLOP/s timing")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--shared", action="store_true", help="also measure a machine shared with a busy core")
    parser.add_argument("--shared-repeats", type=int, default=3, help="shared-machine timing repeats (median)")
    args = parser.parse_args()
    n_train = int(args.n_imgs * 0.9) * args.n_tokens
    if n_train < args.n_steps * args.batch_size:
        print(f"note: {args.n_steps} steps of {args.batch_size} exceed one epoch ({n_train} vectors): epochs cycle")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {config.resolve_device(args.device)}"
        + (f" ({torch.cuda.get_device_name()})" if config.resolve_device(args.device) == "cuda" else "")
    )

    if not args.skip_flops:
        bench_flops(args)
    if args.skip_sweep and not args.shared:
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = plant_store(os.path.join(tmp, "store"), args)
        normalization(store, config.DataLoadConfig(shard_root=store.path, layer=-2))  # cache the statistics once
        trainer.train_sweep(member_cfgs(store, args, 1, os.path.join(tmp, "warmup")), show_progress=False)
        if not args.skip_sweep:
            with ReadCounter():
                bench_sweep(args, store, tmp)
        if args.shared:
            bench_shared(args, store, tmp)


if __name__ == "__main__":
    main()
