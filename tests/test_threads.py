"""The thread rule's decisions, on a fake machine: a fake clock advanced by a known cost per step and thread count,
so the best count is known in advance and nothing is timed."""

import os

import pytest

from saev_core import threads
from saev_core.errors import UserError


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(cost, n_max: int, n_steps: int, size=lambda step: 1, **kw) -> tuple[threads.ThreadTuner, list[int], float]:
    """Step a tuner through ``n_steps`` whose per-unit seconds are ``cost(step, n_threads)``; returns the tuner, the
    count each step ran with, and the total fake time."""
    clock, applied = FakeClock(), []
    tuner = threads.ThreadTuner(n_max, clock=clock, set_threads=applied.append, **kw)
    used = []
    for step in range(n_steps):
        used.append(tuner.threads)
        clock.now += cost(step, tuner.threads) * size(step)
        tuner.step_done(size(step))
    assert all(1 <= n <= n_max for n in applied)
    return tuner, used, clock.now


def idle_2_cores(step, n):  # measured shape: 2 threads 1.6x faster than 1
    return {1: 0.8, 2: 0.5}[n]


def busy_core(step, n):  # one core taken elsewhere: 2 threads stall (4.8x slower than 1)
    return {1: 0.8, 2: 3.8}[n]


def best_fixed_time(cost, n_max, n_steps):
    return min(sum(cost(s, n) for s in range(n_steps)) for n in range(1, n_max + 1))


def test_idle_keeps_every_core_and_loses_little_to_probing():
    tuner, used, total = run(idle_2_cores, 2, 2000)
    assert tuner.threads == 2 and tuner.changes == []
    assert used[:5] == [2, 2, 2, 1, 1]  # the reference window, then the probe of one fewer (two steps)
    assert used.count(1) <= 2 * 12  # each probe of the slower count stops after two steps
    assert total <= 1.05 * best_fixed_time(idle_2_cores, 2, 2000)


def test_a_busy_core_from_the_start_switches_to_one_fewer():
    tuner, used, total = run(busy_core, 2, 2000)
    assert tuner.changes[0] == (5, 2, 1)  # 3 reference steps, 2 probe steps
    assert used[5:80] == [1] * 75  # until the first re-check, 60 s later
    assert tuner.threads == 1
    assert total <= 1.5 * best_fixed_time(busy_core, 2, 2000)


def test_load_that_comes_and_goes_is_followed():
    def cost(step, n):
        return busy_core(step, n) if 300 <= step < 600 else idle_2_cores(step, n)

    tuner, used, total = run(cost, 2, 1500)
    assert used[299] == 2 and used[305:310] == [1] * 5  # the jump is seen within a window
    assert used[300:600].count(2) <= 5 + 2 * 6  # then only the re-checks' probes run 2 threads
    back = [s for s, a, b in tuner.changes if (a, b) == (1, 2) and s > 600]
    assert back and back[0] - 600 <= threads.MAX_RECHECK_S / 0.8 + 5  # back within the longest re-check wait
    assert used[-1] == 2
    assert total <= 1.5 * sum(min(cost(s, 1), cost(s, 2)) for s in range(1500))


def test_many_cores_with_several_busy_walk_down_to_the_free_ones():
    free = 5  # 8 CPUs, 3 busy elsewhere: up to 5 threads scale, each one beyond that adds to the stall

    def cost(step, n):
        return (1 + 3 * max(0, n - free) / n) / min(n, free)

    tuner, _, _ = run(cost, 8, 200)
    assert [(a, b) for _, a, b in tuner.changes] == [(8, 7), (7, 6), (6, 5)]
    assert tuner.threads == free


def test_one_slow_step_is_not_a_slower_count():
    def cost(step, n):  # the first step (allocating) and a checkpoint save every 50 steps cost ten steps
        return idle_2_cores(step, n) * (10 if step % 50 == 49 or step == 0 else 1)

    tuner, _, _ = run(cost, 2, 1000)
    assert tuner.changes == [] and tuner.threads == 2


def test_steps_compare_per_unit_so_a_short_batch_is_not_faster():
    def size(step):  # images per batch; the probe's two batches are short
        return 3 if step in (3, 4) else 32

    tuner, used, _ = run(idle_2_cores, 2, 100, size=size)  # idle_2_cores: seconds per image
    assert used[3:5] == [1, 1] and tuner.changes == [] and tuner.settled == 2


def test_settle_ends_a_probe_on_the_count_it_came_from():
    clock, applied = FakeClock(), []
    tuner = threads.ThreadTuner(2, clock=clock, set_threads=applied.append)
    for _ in range(3):  # the reference window: the probe of 1 thread begins
        clock.now += 0.5
        tuner.step_done()
    assert tuner.threads == 1 and tuner.settled == 2
    tuner.settle()
    assert tuner.threads == 2 and applied == [1, 2]


def test_explicit_count_or_a_gpu_times_nothing(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    explicit = threads.tuner_for(3, "cpu")
    gpu = threads.tuner_for(None, "cuda")
    auto = threads.tuner_for(None, "cpu")
    assert (explicit.threads, explicit.fixed) == (3, True)
    assert (gpu.threads, gpu.fixed) == (8, True)
    assert (auto.threads, auto.fixed) == (8, False)
    assert threads.tuner_for(None, "cpu").threads == threads.usable_cpus() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert threads.tuner_for(None, "cpu").fixed  # one CPU: nothing to choose
    for _ in range(50):
        explicit.step_done()
    assert explicit.threads == 3 and explicit.changes == []
    with pytest.raises(UserError, match="--n-threads 0 must be at least 1"):
        threads.tuner_for(0, "cpu")


def test_apply_sets_torchs_count_and_puts_it_back():
    import torch

    outside = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with threads.apply(threads.ThreadTuner(2, fixed=True)) as tuner:
            assert torch.get_num_threads() == 2
            tuner.set_threads(1)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(outside)
