"""The default thread count (``saev_core.threads``: timed while it runs) vs every fixed ``--n-threads``, on the
machine idle and with one core kept busy by a spinning process this benchmark starts (another user's job).

Each cell trains the same sweep with ``train_sweep`` on a planted store on disk (loader, logs, NaN checks included)
and reports training steps per second over steps 1..n-1 (the first step is a warm-up for every setting; the
default's probes of other counts are inside the timed steps). Cells are interleaved round by round, so drift in the
machine's load hits every setting; the median of ``--repeats`` rounds is kept. The goal (issue 19): default / best
fixed >= 0.95 idle and >= 1 / 1.5 with a busy core. Beside each cell it prints how many cores other processes kept
busy meanwhile (the machine's busy time less this process's; the busy block's spinner counts as one), because on a
shared machine the figures move with it.

    .venv/bin/python benchmarks/bench_threads.py [--d-vit 256] [--exp-factor 16] [--batch-size 1024]
        [--n-steps 60] [--k 1] [--arch relu] [--repeats 2] [--loads idle,busy]
"""

import argparse
import collections
import dataclasses
import logging
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_training import busy_core, member_cfgs, plant_store  # noqa: E402

from saev_core import config, nn, threads  # noqa: E402
from saev_core.store.stats import normalization  # noqa: E402
from saev_core.train import trainer  # noqa: E402


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds every process on the machine has used, CPU seconds this process has used).

    The load average counts this benchmark's own threads, so it cannot say whether the machine was idle; the
    machine's busy time (/proc/stat) less this process's own is what other processes took."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def others_cores(before: tuple[float, float, float]) -> float:
    """The cores other processes kept busy on average since ``before`` (from ``cpu_seconds``)."""
    after = cpu_seconds()
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])


def time_run(cfgs: list[config.TrainConfig]) -> tuple[float, collections.Counter]:
    """(steps per second over steps 1..n-1, how many steps ran at each thread count) of one sweep."""
    stamps, counts = [], collections.Counter()
    last = trainer.member_id(trainer.fit_to_run(cfgs[-1])[0])

    def on_log(step, mid, record):
        if mid == last:  # the last member finishes each step
            stamps.append(time.perf_counter())
            counts[torch.get_num_threads()] += 1  # the count the next step runs with

    trainer.train_sweep(cfgs, show_progress=False, on_log=on_log)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-vit", type=int, default=256)
    parser.add_argument("--exp-factor", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n-steps", type=int, default=60)
    parser.add_argument("--n-imgs", type=int, default=1200)
    parser.add_argument("--n-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=1, help="SAEs per pass")
    parser.add_argument("--arch", default="relu", choices=list(nn.ARCHS))
    parser.add_argument("--repeats", type=int, default=2, help="rounds (median)")
    parser.add_argument("--loads", default="idle,busy", help="idle, busy (one core spun by another process)")
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    args = parser.parse_args()
    logging.getLogger("saev_core.train").setLevel(logging.ERROR)  # the short run's notes on fitted settings
    n_cpus = threads.usable_cpus()
    settings: dict[str, int | None] = {"default": None, **{f"{n} fixed": n for n in range(1, n_cpus + 1)}}
    loads = args.loads.split(",")
    print(
        f"torch {torch.__version__}; {n_cpus} usable CPUs; sweep of {args.k} {args.arch} SAE(s), d_vit {args.d_vit}, "
        f"d_sae {args.d_vit * args.exp_factor}, {args.n_steps} steps of {args.batch_size}; load average "
        f"(1/5/15 min) {load()}",
        flush=True,
    )
    rates: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    others: dict[str, list[float]] = collections.defaultdict(list)
    chosen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory() as tmp:
        store = plant_store(os.path.join(tmp, "store"), args)
        normalization(store, config.DataLoadConfig(shard_root=store.path, layer=-2))  # cache the statistics once
        trainer.train_sweep(member_cfgs(store, args, 1, os.path.join(tmp, "warmup")), show_progress=False)
        for rep in range(args.repeats):
            for where in loads:
                with busy_core(where == "busy"):
                    for name, n in settings.items():
                        before = cpu_seconds()
                        folder = os.path.join(tmp, f"{rep}-{where}-{name}")
                        cfgs = member_cfgs(store, args, args.k, folder, n_threads=n)
                        cfgs = [dataclasses.replace(c, log_every=1) for c in cfgs]  # a time stamp per step
                        rate, counts = time_run(cfgs)
                        rates[where, name].append(rate)
                        others[where].append(others_cores(before))
                        if n is None:
                            chosen[where] += counts
                        print(
                            f"  round {rep}: {where:4s} {name:8s} {rate:6.2f} steps/s  other processes "
                            f"{others[where][-1]:.2f} cores",
                            flush=True,
                        )

    print(f"\n== training steps/s, median of {args.repeats} ==")
    print(f"{'threads':>10} " + " ".join(f"{where:>10}" for where in loads))
    for name in settings:
        print(f"{name:>10} " + " ".join(f"{statistics.median(rates[where, name]):>10.2f}" for where in loads))
    best = {w: max((statistics.median(rates[w, s]), s) for s in settings if s != "default") for w in loads}
    ratio = {w: statistics.median(rates[w, "default"]) / best[w][0] for w in loads}
    print(f"{'best fixed':>10} " + " ".join(f"{best[w][1]:>10}" for w in loads))
    print(f"{'default/best':>10} " + " ".join(f"{ratio[w]:>10.2f}" for w in loads))
    goal = {"idle": 0.95, "busy": 1 / 1.5}
    print(f"{'goal':>10} " + " ".join(f"{'>= ' + format(goal.get(w, 0), '.2f'):>10}" for w in loads))
    for w in loads:
        steps = ", ".join(f"{c} steps at {n}" for n, c in sorted(chosen[w].items()))
        print(
            f"default, {w}: {steps} (all rounds); other processes kept {statistics.mean(others[w]):.2f} cores busy "
            f"on average (most {max(others[w]):.2f})"
        )
    print(f"load average at the end: {load()}")
    if "idle" in loads and max(others["idle"]) > 0.3:
        print("(the 'idle' block was not idle: other processes held the CPUs, see the cores above)")


if __name__ == "__main__":
    main()
