"""CPU threads for torch that fit the machine as it is now: every loop of steps (training, the top-k pass, splice-in,
inference) times its own steps and keeps the faster of neighbouring thread counts.

Why timing rather than a fixed rule: torch's threads meet at every operation, so one of them losing its core to
another process stalls all of them (4.8x slower on 2 cores with one core busy elsewhere, docs/benchmarks.md), while
on an idle machine every core helps (2 threads 1.6x faster than 1 on 2 cores). Only the run itself can tell which
case it is in, and the case can change while it runs.

The rule (``ThreadTuner``, docs/training.md): start with every usable CPU (``usable_cpus``); the median of the first
``window`` steps is the reference (a slow first step, allocating, is one of three); then probe one thread fewer for
up to ``window`` steps and move there only if its median is faster by ``min_gain`` (the probe stops as soon as its
median is decided, so a much slower candidate costs two steps). After a move the next count in the same direction
is probed too. Probes come again when the median of the last ``window`` steps jumps by ``jump`` (slower: one fewer;
faster: one more) and every ``recheck_s`` seconds (one more when below the maximum, else one fewer), the wait
doubling up to ``max_recheck_s`` while the answer stays the same. Steps are compared per unit (``step_done(size)``),
so a short last batch does not read as a faster count. An explicit count, or a device other than the CPU (its steps
are asynchronous, and torch's CPU threads are not what it waits on), turns the timing off.

Imports torch only inside ``apply`` (the base layer is read by torch-free code).
"""

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator

from saev_core.errors import UserError

logger = logging.getLogger(__name__)

RECHECK_S = 60.0
"""Seconds between probes while nothing changes (doubling up to ``MAX_RECHECK_S``)."""
MAX_RECHECK_S = 120.0
JUMP = 1.5
"""A step median this many times slower (or faster) than the reference probes at once."""
MIN_GAIN = 0.02
"""A probed count must be this much faster (per unit) to be kept."""


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def check_n_threads(n_threads: int | None, flag: str = "--n-threads") -> None:
    if n_threads is not None and n_threads < 1:
        raise UserError(f"{flag} {n_threads} must be at least 1 (or leave it unset to time the choice).")


class ThreadTuner:
    """The thread count of one loop of comparable steps; call ``step_done(size)`` after each step.

    ``clock`` (seconds) times the steps and ``set_threads`` applies a count; both are injectable so the decisions
    can be tested without timing anything. ``fixed`` keeps ``n_max`` and times nothing."""

    def __init__(
        self,
        n_max: int,
        *,
        fixed: bool = False,
        clock: Callable[[], float] = time.perf_counter,
        set_threads: Callable[[int], None] | None = None,
        window: int = 3,
        recheck_s: float = RECHECK_S,
        max_recheck_s: float = MAX_RECHECK_S,
        jump: float = JUMP,
        min_gain: float = MIN_GAIN,
    ):
        if n_max < 1:
            raise ValueError(f"n_max {n_max} must be at least 1")
        self.n_max, self.fixed, self.clock, self.set_threads = n_max, fixed or n_max == 1, clock, set_threads
        self.window, self.jump, self.min_gain = window, jump, min_gain
        self.recheck_s, self.max_recheck_s, self.interval = recheck_s, max_recheck_s, recheck_s
        self.threads = n_max
        """The count the next step runs with."""
        self.changes: list[tuple[int, int, int]] = []
        """(step, from, to) for every count kept after a probe: what the run chose, for logs and benchmarks."""
        self.n_steps = 0
        self._times: list[float] = []  # per-unit seconds at ``threads`` since it was last decided
        self._reference: float | None = None
        self._probe: tuple[int, int, float, bool] | None = None  # (count probed from, direction, its median, moved)
        self._last = clock()
        self._next_check = math.inf

    @property
    def settled(self) -> int:
        """The best count known: the current one, or the one a probe in flight would go back to."""
        return self.threads if self._probe is None else self._probe[0]

    def start(self) -> None:
        """Restart the step clock (after a pause that is no step, e.g. between two calls of an ``Explainer``)."""
        self._last = self.clock()

    def settle(self) -> None:
        """End a probe in flight without a decision (the loop is over), going back to the count it probed from."""
        if self._probe is not None:
            self._use(self._probe[0])
            self._probe, self._times = None, []

    def step_done(self, size: float = 1.0) -> None:
        """One step of ``size`` units (vectors, images) has finished; may change the count for the next step."""
        now = self.clock()
        per_unit, self._last = (now - self._last) / max(size, 1e-12), now
        self.n_steps += 1
        if self.fixed:
            return
        self._times.append(per_unit)
        if self._probe is not None:
            self._judge_probe(now)
        elif len(self._times) >= self.window:
            del self._times[: -self.window]
            self._watch(now, statistics.median(self._times))

    # ------------------------------------------------------------------------------------------------------------

    def _watch(self, now: float, median: float) -> None:
        """At the current count: set the reference, or probe on a jump or when the re-check is due."""
        if self._reference is None:  # the first window: probe one fewer at once
            self._reference = median
            self._begin_probe(-1, median, now)
        elif median > self._reference * self.jump:
            self._begin_probe(-1, median, now)
        elif median * self.jump < self._reference:
            self._begin_probe(+1, median, now)
        elif now >= self._next_check:
            self._begin_probe(+1 if self.threads < self.n_max else -1, median, now)

    def _begin_probe(self, direction: int, median: float, now: float, moved: bool = False) -> None:
        """Try one thread more or fewer; ``moved``: this probe follows a move in the same direction."""
        candidate = self.threads + direction
        if not 1 <= candidate <= self.n_max:
            self._decided(median, now, changed=moved)
            return
        self._probe = (self.threads, direction, median, moved)
        self._times = []
        self._use(candidate)

    def _judge_probe(self, now: float) -> None:
        """Median of up to ``window`` probe steps against the count probed from, decided as soon as it is known."""
        origin, direction, baseline, moved = self._probe
        need = self.window // 2 + 1
        faster = sum(t < baseline * (1 - self.min_gain) for t in self._times)
        if faster >= need:  # keep it, and try the next count the same way
            self.changes.append((self.n_steps, origin, self.threads))
            logger.info(
                "CPU threads %d -> %d after %d steps: median %.3g s per unit of work instead of %.3g.",
                origin,
                self.threads,
                self.n_steps,
                statistics.median(self._times),
                baseline,
            )
            self._probe = None
            self._begin_probe(direction, statistics.median(self._times), now, moved=True)
        elif len(self._times) - faster >= need:  # not faster: back to where it was
            self._probe = None
            self._use(origin)
            self._decided(baseline, now, changed=moved)

    def _decided(self, reference: float, now: float, changed: bool) -> None:
        self._reference, self._times = reference, []
        self.interval = self.recheck_s if changed else min(2 * self.interval, self.max_recheck_s)
        self._next_check = now + self.interval

    def _use(self, n: int) -> None:
        self.threads = n
        if self.set_threads is not None:
            self.set_threads(n)


def describe(tuner: ThreadTuner) -> str:
    """How the count is chosen, for the start-of-run log line."""
    if tuner.fixed:
        return f"{tuner.threads} CPU threads"
    return f"{tuner.n_max} CPU threads to begin with (one fewer kept while it times faster, re-checked as it runs)"


def tuner_for(n_threads: int | None, device: str, **kw) -> ThreadTuner:
    """Explicit ``n_threads`` wins; otherwise every usable CPU, timed on the CPU (``ThreadTuner``), fixed elsewhere."""
    check_n_threads(n_threads)
    if n_threads is not None:
        return ThreadTuner(n_threads, fixed=True, **kw)
    return ThreadTuner(usable_cpus(), fixed=not device.startswith("cpu"), **kw)


@contextlib.contextmanager
def apply(tuner: ThreadTuner) -> Iterator[ThreadTuner]:
    """torch's intra-op threads follow ``tuner`` inside the block, then are put back to what they were."""
    import torch

    before, own = torch.get_num_threads(), tuner.set_threads
    tuner.set_threads = torch.set_num_threads
    torch.set_num_threads(tuner.threads)
    tuner.start()
    try:
        yield tuner
    finally:
        tuner.set_threads = own
        torch.set_num_threads(before)
