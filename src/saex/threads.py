"""CPU threads for repeated steps (training, the index's ablation) when other processes share the cores.

Torch's OpenMP threads split every operation evenly and wait for each other at its end. When another
busy process takes a core, the thread on that core runs a fraction of the time and the rest wait for
it, spinning and sleeping: on 2 cores beside one busy process a TopK step (d 384, 3,072 latents, batch
1,024) took 184-214 ms with 2 threads against 35 ms with 1, and 24 ms alone with 2
(benchmarks/contention.py). OMP_WAIT_POLICY=PASSIVE avoids most of it but costs 29 % alone.

So the tuner keeps torch's thread count while steps take their usual time, and when they turn
markedly slower it times a few steps at each of max, max/2, ..., 1 threads and keeps the fastest; a
minute later it tries again, so the threads come back when the cores are free. The thread count sets
the order of floating-point sums, so a run whose tuner moved differs from an undisturbed one by
rounding; `--threads N` pins the count (bit-for-bit reproducible, whatever else runs)."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

import torch

SLOWER = 2.0  # a step this many times the recent typical one is a sign of contention
PATIENCE = 3  # ... when this many steps in a row are
PROBE_STEPS = 3  # steps timed per candidate thread count
RETRY_S = 60.0  # with fewer threads than the maximum, probe again after this long


class ThreadTuner:
    def __init__(self, threads: int = 0, active: bool = True, clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] = torch.set_num_threads, max_threads: int | None = None):
        """`threads` > 0 pins that many; 0 tunes between 1 and torch's count (or `max_threads`); inactive
        (steps on a GPU), it only times."""
        self.active, self.clock, self.set_threads = active, clock, set_threads
        self.max = max_threads or torch.get_num_threads()
        self.pinned = threads > 0
        self.current = threads if self.pinned else self.max
        if self.pinned and active:
            set_threads(threads)
        self.typical: float | None = None  # seconds of a step at the current count (a running median)
        self.recent: list[float] = []
        self.slow_run = 0
        self.probing: list[tuple[int, list[float]]] = []  # candidates left, with their timings
        self.last_probe = clock()
        self.changes: list[tuple[int, int]] = []  # (from, to) thread counts, for the log

    @contextlib.contextmanager
    def timed(self):
        """Around one training step."""
        start = self.clock()
        yield
        self.observe(self.clock() - start)

    def observe(self, seconds: float) -> None:
        if self.pinned or self.max == 1 or not self.active:
            return
        if self.probing:
            return self._probe(seconds)
        self.recent = (self.recent + [seconds])[-9:]
        self.slow_run = self.slow_run + 1 if self.typical and seconds > SLOWER * self.typical else 0
        if self.slow_run >= PATIENCE or (self.current < self.max and self.clock() - self.last_probe > RETRY_S):
            self.probe()
        elif len(self.recent) >= 3:
            self.typical = statistics.median(self.recent)

    def probe(self) -> None:
        """Time the next steps at max, max/2, ..., 1 threads and keep the fastest (a pass too short to
        notice a slowdown calls this first)."""
        if self.pinned or self.max == 1 or not self.active:
            return
        counts, n = [], self.max
        while n >= 1:
            counts.append(n)
            n //= 2
        self.probing = [(n, []) for n in counts]
        self.set_threads(counts[0])

    def _probe(self, seconds: float) -> None:
        for n, times in self.probing:
            if len(times) < PROBE_STEPS:
                times.append(seconds)
                break
        pending = [n for n, times in self.probing if len(times) < PROBE_STEPS]
        if pending:
            self.set_threads(pending[0])
            return
        best, times = min(self.probing, key=lambda c: statistics.median(c[1]))
        if best != self.current:
            self.changes.append((self.current, best))
        self.current, self.probing, self.last_probe = best, [], self.clock()
        self.set_threads(best)
        self.typical, self.recent, self.slow_run = statistics.median(times), [], 0


@contextlib.contextmanager
def torch_threads(n: int = 0):
    """torch on `n` threads inside (0: as it is); the process-wide count comes back after, however it ends."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
