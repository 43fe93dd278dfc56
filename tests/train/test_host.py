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
    where = {mode: subprocess.run([sys.executable, "-c", WHERE, mode], capture_output=True, text=True,
                                  check=True).stdout.strip() for mode in ("default", "tuned")}
    assert where == {"default": "False", "tuned": "True"}
