"""The host process's memory allocator, tuned for training steps on the CPU.

Each step allocates and frees the same few large buffers (pre-activations, gradients: 5 to 13 MB at
d_in 384 and 6,144 latents). glibc hands freed memory at the top of its heap back to the kernel once it
exceeds a threshold, so the next step takes every page again as a fault: about 2,050 minor faults per
step there, against about 100 with the thresholds below (41.6 and 36.2 against 34.0 and 34.5 ms per
TopK step on 2 cores). PyTorch's CPU tuning guide makes the same point with jemalloc or tcmalloc; this
keeps glibc and only raises its thresholds.

The price: the process keeps up to 1 GiB of freed memory mapped for as long as it lives (40 freed
buffers of 20 MiB left 1,094 MiB resident, against 294 MiB untuned); `saex train` is its own process.
A setting of the user's own (glibc's MALLOC_* variables or tunables, a preloaded allocator) wins:
then nothing is changed."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to this size come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # free memory the heap keeps before it shrinks


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not glibc
    or the user tuned the allocator (nothing is changed then)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_tuned():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def user_tuned() -> bool:
    """Whether the environment already chose the allocator's behaviour."""
    env = os.environ
    return (any(name.startswith("MALLOC_") for name in env) or "glibc.malloc" in env.get("GLIBC_TUNABLES", "")
            or "malloc" in env.get("LD_PRELOAD", ""))
