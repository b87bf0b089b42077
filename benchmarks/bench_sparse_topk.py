"""Sparse vs dense topk training steps, measured side by side in one run.

For each row (arch, k): two copies of one SAE (same init), one training through the dense forward (the reference)
and one through ``saev_core.nn.sparse_topk``, each doing ``--n-steps`` full training steps (``trainer.train_step``:
forward, backward, decoder-norm hooks, clipping, Adam) on the same batches already in memory. The two alternate
``--repeats`` times (so drift in the machine's load hits both); the table gives the median patches/s of each and
their ratio. Goal: topk at d_vit 768, d_sae 6144, k 32 trains >= 2.5x faster sparse than dense on the CPU.

An ``aux`` row marks the first ``--aux-dead`` latents dead before every timed run, so AuxK (top-k_aux of the dead
latents) works in every step. ``--profile`` adds where one sparse and one dense step spend their time
(torch.profiler, self CPU time per op).

    .venv/bin/python benchmarks/bench_sparse_topk.py [--d-vit 768] [--d-sae 6144] [--batch-size 4096]
        [--rows topk:32,batchtopk:32,topk:128,topk:32:aux] [--n-steps 3] [--repeats 3] [--device auto]
        [--profile]

Training uses every usable CPU (``threads.usable_cpus``), where ``train``'s timing of its steps starts.
"""

import argparse
import copy
import os
import statistics
import time

import torch

from saev_core import config, nn, threads
from saev_core.nn import sparse_topk
from saev_core.train import trainer


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_members(args, arch: str, k: int, device: str) -> tuple[trainer.Member, trainer.Member]:
    sae_cfg = config.SparseAutoencoderConfig(
        d_vit=args.d_vit, exp_factor=args.d_sae // args.d_vit, arch=arch, k=k, dead_after_n_patches=10**9
    )
    cfg = config.TrainConfig(sae=sae_cfg, lr=1e-4, n_lr_warmup=2)
    members = []
    dense = nn.make_sae(sae_cfg).train()
    for sparse in (False, True):
        sae = copy.deepcopy(dense).to(device)
        sae.sparse_training = sparse
        members.append(trainer.Member(cfg, "", "", sae, torch.optim.Adam(sae.parameters(), lr=1e-4)))
    return members[0], members[1]


def timed_run(m: trainer.Member, batches: list[torch.Tensor], n_dead: int, device: str) -> float:
    """Seconds for one training step per batch; the first ``n_dead`` latents are marked dead first."""
    if n_dead:
        m.sae.n_patches_since_fired[:n_dead] = m.sae.dead_after_n_patches
    sync(device)
    t0 = time.perf_counter()
    for step, x in enumerate(batches):
        trainer.train_step(m, x, 10 + step, 1000)
    sync(device)
    return time.perf_counter() - t0


def bench_row(args, row: str, batches: list[torch.Tensor], device: str) -> dict:
    arch, k, *flags = row.split(":")
    n_dead = args.aux_dead if "aux" in flags else 0
    dense, sparse = make_members(args, arch, int(k), device)
    for m in (dense, sparse):  # warm-up (allocations, first-call costs)
        timed_run(m, batches[:1], n_dead, device)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for _ in range(args.repeats):
        for name, m in (("dense", dense), ("sparse", sparse)):
            times[name].append(timed_run(m, batches, n_dead, device))
    n = len(batches) * args.batch_size
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    return {
        "row": row,
        "dense": rate["dense"],
        "sparse": rate["sparse"],
        "ratio": rate["sparse"] / rate["dense"],
        "ratios": [d / s for d, s in zip(times["dense"], times["sparse"])],
        "auto": sparse_topk.use_sparse("auto", dense.cfg.sae),
    }


def profile_step(args, row: str, batch: torch.Tensor, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    arch, k, *flags = row.split(":")
    dense, sparse = make_members(args, arch, int(k), device)
    for name, m in (("dense", dense), ("sparse", sparse)):
        trainer.train_step(m, batch, 10, 1000)
        if "aux" in flags:
            m.sae.n_patches_since_fired[: args.aux_dead] = m.sae.dead_after_n_patches
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(m, batch, 11, 1000)
        print(f"\n== where one {name} {row} step spends its time (self CPU time, top 12 ops) ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-vit", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument(
        "--rows", default="topk:32,batchtopk:32,topk:128,topk:32:aux", help="comma-separated ARCH:K[:aux] rows"
    )
    parser.add_argument("--aux-dead", type=int, default=1024, help="latents marked dead in the aux rows")
    parser.add_argument("--n-steps", type=int, default=3, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (median)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--profile", action="store_true", help="also profile one step of the first row")
    args = parser.parse_args()
    device = config.resolve_device(args.device)
    n_threads = threads.usable_cpus()
    torch.set_num_threads(n_threads)
    print(
        f"torch {torch.__version__}, {n_threads} training threads of {os.cpu_count()} CPUs, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
        + f", load average {os.getloadavg()[0]:.1f}"
    )
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, args.d_vit, generator=gen) + 1).to(device) for _ in range(args.n_steps)]

    print(
        f"\n== training steps, sparse vs dense ({args.n_steps} steps of {args.batch_size} x {args.d_vit} -> d_sae "
        f"{args.d_sae}; median of {args.repeats} interleaved runs) =="
    )
    print(
        f"{'row':>18} {'k/d_sae':>8} {'dense patches/s':>16} {'sparse patches/s':>17} {'sparse/dense':>13} "
        f"{'per run':>18} {'auto':>7}"
    )
    for row in args.rows.split(","):
        r = bench_row(args, row, batches, device)
        k = int(row.split(":")[1])
        per_run = "/".join(f"{x:.2f}" for x in r["ratios"])
        print(
            f"{row:>18} {k / args.d_sae:>8.4f} {r['dense']:>16,.0f} {r['sparse']:>17,.0f} {r['ratio']:>13.2f} "
            f"{per_run:>18} {'sparse' if r['auto'] else 'dense':>7}",
            flush=True,
        )
    print(
        f"(aux rows: {args.aux_dead} latents dead, k_aux {config.SparseAutoencoderConfig.k_aux}; auto: what "
        f"--sparse-topk auto picks, k / d_sae <= {sparse_topk.MAX_AUTO_K_FRACTION:.4f}; load average "
        f"after: {os.getloadavg()[0]:.1f})"
    )
    if args.profile:
        profile_step(args, args.rows.split(",")[0], batches[0], device)


if __name__ == "__main__":
    main()
