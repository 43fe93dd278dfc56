import os
import platform
import subprocess
import sys

import pytest

WHERE = """
import sys, torch
from saex.train.host import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator()
buf = torch.empty(5 << 20)  # 20 MiB, as a large training step's pre-activations
heap = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")]
print(any(int(lo, 16) <= buf.data_ptr() < int(hi, 16) for lo, hi in heap))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_tuned_allocator_serves_large_buffers_from_the_reused_heap():
    """Untuned, glibc maps a fresh region for a 20 MiB buffer and unmaps it when freed, so each step
    faults its pages in again; tuned, the buffer comes from the heap, which keeps freed pages."""
    env = {name: value for name, value in os.environ.items()  # glibc's defaults, whatever the caller set
           if not name.startswith("MALLOC_") and name not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    where = {mode: subprocess.run([sys.executable, "-c", WHERE, mode], capture_output=True, text=True, env=env,
                                  check=True).stdout.strip() for mode in ("default", "tuned")}
    assert where == {"default": "False", "tuned": "True"}


def test_a_users_own_allocator_settings_win(monkeypatch):
    from saex.train import host

    for name, value in (("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536"),
                        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert host.user_tuned() and not host.tune_allocator()
