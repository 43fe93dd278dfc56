"""Files and folders that appear whole or not at all: write to a temporary name, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all, with the permissions the user's umask gives a new file
    (mkstemp's file is private to its owner; a shared run folder is meant to be read by the group)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # name the file: a full disk's write names none
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_folder(dest: Path):
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        mask = umask()
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp makes private folders; these are ordinary files
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
            if p.is_file():
                _fsync(p)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(dest)) from e  # the folder the user knows, not its temporary name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
