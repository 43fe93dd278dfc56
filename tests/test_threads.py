"""The thread tuner against a simulated machine: 4 cores, steps that take 1/threads alone, and far
longer with more threads than the cores left free while another process is busy."""

from saex.threads import RETRY_S, ThreadTuner


class Machine:
    def __init__(self):
        self.now, self.threads, self.busy_cores = 0.0, 4, 0

    def clock(self):
        return self.now

    def set_threads(self, n):
        self.threads = n

    def step_seconds(self):
        free = 4 - self.busy_cores
        if self.threads <= free:
            return 1.0 / self.threads
        return 8.0 / self.threads  # threads waiting on a thread that shares its core


def _run(tuner, machine, steps):
    for _ in range(steps):
        with tuner.timed():
            machine.now += machine.step_seconds()


def test_tuner_gives_threads_up_under_contention_and_takes_them_back():
    m = Machine()
    tuner = ThreadTuner(clock=m.clock, set_threads=m.set_threads, max_threads=4)
    _run(tuner, m, 50)
    assert (tuner.current, m.threads, tuner.changes) == (4, 4, [])  # undisturbed: never moves
    m.busy_cores = 2  # two busy processes arrive: 4 threads take 2 s a step, 2 threads 0.5 s
    _run(tuner, m, 30)
    assert (tuner.current, m.threads) == (2, 2) and tuner.changes == [(4, 2)]
    _run(tuner, m, 20)
    assert m.threads == 2  # no retry before RETRY_S
    m.busy_cores = 0
    _run(tuner, m, int(RETRY_S / 0.5) + 20)
    assert (tuner.current, m.threads) == (4, 4) and tuner.changes == [(4, 2), (2, 4)]


def test_pinned_or_inactive_tuner_never_moves():
    for kwargs in ({"threads": 3}, {"active": False}):
        m = Machine()
        m.busy_cores = 3
        tuner = ThreadTuner(clock=m.clock, set_threads=m.set_threads, max_threads=4, **kwargs)
        _run(tuner, m, 100)
        assert tuner.changes == [] and m.threads == kwargs.get("threads", 4)
