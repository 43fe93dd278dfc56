"""One writer at a time: an advisory lock per thing a stage writes (a run's SAE, index or store).

The kernel releases the lock when its holder dies, however it dies, so a killed stage never leaves a
lock that blocks its rerun; the file that carries it may stay and means nothing on its own."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking (saex's runs are written on Linux and macOS)
    fcntl = None


@contextlib.contextmanager
def exclusive(paths: list[Path], what: str):
    """Hold the locks at `paths` (sorted, so that two stages never wait on each other); a held one
    raises ValueError saying which process holds it."""
    with contextlib.ExitStack() as stack:
        for path in sorted(set(map(Path, paths))):
            stack.enter_context(_lock(path, what))
        yield


@contextlib.contextmanager
def reading(path: Path, what: str):
    """A shared hold on what `path` guards (a run's store): many readers at once, no writer meanwhile."""
    with _lock(Path(path), what, shared=True):
        yield


@contextlib.contextmanager
def _lock(path: Path, what: str, shared: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise ValueError(f"another saex process (pid {holder}) holds {path}, which {what} needs: "
                                 "wait for it to finish, or choose another --name") from None
            os.pwrite(fd, f"{os.getpid():<12d}\n".encode(), 0)  # the latest holder (fixed width: no truncate)
        yield
    finally:
        os.close(fd)
