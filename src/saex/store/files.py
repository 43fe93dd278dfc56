"""Shard files: atomic safetensors writes with their sha256, and memory-mapped reads."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch

from saex.atomic import atomic_write_bytes

# safetensors dtype names -> (numpy storage dtype, torch dtype)
_DTYPES = {
    "BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16), "F32": (np.float32, torch.float32),
    "F64": (np.float64, torch.float64), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16), "U8": (np.uint8, torch.uint8), "I8": (np.int8, torch.int8),
    "BOOL": (np.bool_, torch.bool),
}


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save a safetensors file atomically; returns its sha256."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the byte offset where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def mmap_tensor(path: Path, name: str) -> torch.Tensor:
    """A read-only, memory-mapped view of one tensor of a safetensors file (nothing is read yet)."""
    header, start = read_header(path)
    if name not in header:
        raise KeyError(f"{path} has no tensor {name!r}; it has {sorted(k for k in header if k != '__metadata__')}")
    info = header[name]
    np_dtype, torch_dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    arr = np.memmap(path, dtype=np_dtype, mode="r", offset=start + begin, shape=(count,))
    assert arr.nbytes == end - begin, f"{path}:{name} size mismatch"
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
