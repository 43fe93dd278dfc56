"""Safetensors files read without trusting them: the header's structure and the data's layout are
checked before any tensor is touched, so a truncated or altered file is a ValueError naming it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# safetensors dtype names -> (numpy storage dtype, torch dtype)
DTYPES = {
    "BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16), "F32": (np.float32, torch.float32),
    "F64": (np.float64, torch.float64), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16), "U8": (np.uint8, torch.uint8), "I8": (np.int8, torch.int8),
    "BOOL": (np.bool_, torch.bool),
}


def read_header(path: Path) -> tuple[dict, int, int]:
    """(header, byte offset where the data starts, bytes of data after the header)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            n = int.from_bytes(head, "little")
            if len(head) < 8 or n > size - 8:
                raise ValueError(f"{path} is truncated or corrupt: " + (
                    f"it is {size} bytes long, and a safetensors file starts with an 8-byte header length"
                    if len(head) < 8 else f"its header length field says {n} bytes, but {size - 8} follow it"))
            raw = f.read(n)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    entries = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if entries is None or not all(isinstance(e, dict) and isinstance(e.get("dtype"), str)
                                  and _int_list(e.get("shape")) and _int_list(e.get("data_offsets"), 2)
                                  for e in entries.values()):
        raise ValueError(f"{path} is corrupt: its safetensors header must map each tensor name to its dtype, "
                         "shape and data_offsets")
    return header, 8 + n, size - 8 - n


def check_layout(path: Path, header: dict, data_size: int) -> None:
    """The tensors must tile the data section exactly, as safetensors requires."""
    end = 0
    for name, e in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                          key=lambda kv: kv[1]["data_offsets"]):
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {e['dtype']!r}; readable: {sorted(DTYPES)}")
        begin, stop = e["data_offsets"]
        need = math.prod(e["shape"]) * np.dtype(DTYPES[e["dtype"]][0]).itemsize
        if begin != end or stop - begin != need:
            raise ValueError(f"{path} is corrupt: tensor {name} {e['dtype']}{e['shape']} needs {need} bytes from "
                             f"offset {end}; its header gives bytes [{begin}, {stop})")
        end = stop
    if end != data_size:
        state = "truncated" if end > data_size else f"corrupt ({data_size - end} bytes follow the last tensor)"
        raise ValueError(f"{path} is {state}: its header describes {end} bytes of tensor data, the file holds "
                         f"{data_size}")


def _int_list(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
