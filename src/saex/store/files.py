"""Shard files: atomic safetensors writes with their sha256, and memory-mapped reads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from saex import tensorfile
from saex.atomic import atomic_write_bytes
from saex.tensorfile import DTYPES as _DTYPES

def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save a safetensors file atomically; returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, stop=None) -> str | None:
    """The file's sha256 (None when the threading.Event `stop` is set before the end)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            if stop is not None and stop.is_set():
                return None
            h.update(chunk)
    return h.hexdigest()


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the byte offset where its data starts."""
    header, start, _ = tensorfile.read_header(path)
    return header, start


def check_shard(path: Path, columns: dict[str, dict], rows: int) -> None:
    """What opening a shard checks, cheaply (its header only, no data read): the file's layout, and every
    column the manifest names there with its dtype and shape, `rows` long."""
    header, _, data_size = tensorfile.read_header(path)
    for name, spec in columns.items():
        info = header.get(name)
        want = [rows, *spec["shape"]]
        dtype = str(_DTYPES[info["dtype"]][1]).removeprefix("torch.") if info and info["dtype"] in _DTYPES else None
        if dtype != spec["dtype"] or info["shape"] != want:
            found = f"{info['shape']} {info['dtype']}" if info else "missing"
            raise ValueError(f"{path}: column {name!r} is {found}; the manifest says {want} {spec['dtype']}")
    try:
        tensorfile.check_layout(path, header, data_size)
    except ValueError as e:
        raise ValueError(f"{e}; re-harvest the store (delete its folder and run saex harvest again)") from None


def mmap_tensor(path: Path, name: str) -> torch.Tensor:
    """A read-only, memory-mapped view of one tensor of a safetensors file (nothing is read yet)."""
    header, start = read_header(path)
    if name not in header:
        raise KeyError(f"{path} has no tensor {name!r}; it has {sorted(k for k in header if k != '__metadata__')}")
    info = header[name]
    if info.get("dtype") not in _DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}; readable: {sorted(_DTYPES)}")
    np_dtype, torch_dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    if end - begin != count * np.dtype(np_dtype).itemsize or Path(path).stat().st_size < start + end:
        raise ValueError(f"{path}: tensor {name!r} of shape {list(shape)} does not fit the file's bytes; "
                         "the file is truncated or corrupt")
    arr = np.memmap(path, dtype=np_dtype, mode="r", offset=start + begin, shape=(count,))
    with _no_readonly_warning():
        t = torch.from_numpy(arr)
    return t.view(torch_dtype).reshape(shape) if torch_dtype == torch.bfloat16 else t.reshape(shape)


class _no_readonly_warning:
    """torch warns that a read-only numpy array gives a tensor it could write to; we never write."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
