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
    """A safetensors file's header and the byte offset where its data starts; ValueError naming the file
    when it has none."""
    try:
        size = Path(path).stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (struct.error, ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        reason = "it is shorter than a safetensors header" if isinstance(e, struct.error) else str(e)
        raise ValueError(f"{path} is not a readable safetensors file ({reason})") from None
    return header, 8 + n


def check_shard(path: Path, columns: dict[str, dict], rows: int) -> None:
    """What opening a shard checks, cheaply (its header only, no data read): every column the manifest
    names is there with its dtype and shape, `rows` long, and the file is as long as its header says."""
    header, start = read_header(path)
    end = start
    for name, spec in columns.items():
        info = header.get(name)
        want = [rows, *spec["shape"]]
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
            raise ValueError(f"{path} has no readable column {name!r}; the manifest says it holds {want} "
                             f"{spec['dtype']}")
        dtype = str(_DTYPES[info["dtype"]][1]).removeprefix("torch.")
        offsets = info.get("data_offsets")
        if dtype != spec["dtype"] or info.get("shape") != want or not isinstance(offsets, list) or len(offsets) != 2 \
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
            raise ValueError(f"{path}: column {name!r} is {info.get('shape')} {dtype}; the manifest says {want} "
                             f"{spec['dtype']}")
        itemsize = np.dtype(_DTYPES[info["dtype"]][0]).itemsize
        if offsets[1] - offsets[0] != int(np.prod(want)) * itemsize:
            raise ValueError(f"{path}: column {name!r} has {offsets[1] - offsets[0]} bytes for {want} {dtype}")
        end = max(end, start + offsets[1])
    size = Path(path).stat().st_size
    if size < end:
        raise ValueError(f"{path} is truncated: {size:,} bytes where its header needs {end:,}; re-harvest it "
                         "(delete the store's folder and run saex harvest again)")


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
