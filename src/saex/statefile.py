"""Resumable states (training checkpoints, the index's scan) as files that cannot run code.

A state is a nest of dicts, lists, tuples, numbers, strings, None and tensors. Its tensors go into a
safetensors file and the nest around them into that file's metadata as JSON, so reading one back
unpickles nothing: a crafted file is a corrupt file, never a program (`torch.load` would run a
pickle's code, and `weights_only=True` only narrows what it runs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saex.atomic import atomic_write_bytes

KEY = "saex_state"


def save_state(path: Path, state) -> None:
    """Write `state` to `path` atomically."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}

    def pack(obj):
        if isinstance(obj, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
            return {"tensor": name}
        if isinstance(obj, dict):
            return {"dict": [[pack(k), pack(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"list" if isinstance(obj, list) else "tuple": [pack(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {"value": obj}
        raise TypeError(f"a saved state holds tensors and plain values, not {type(obj).__name__}")

    skeleton = json.dumps(pack(state))
    atomic_write_bytes(path, save(tensors, metadata={KEY: skeleton}))


def load_state(path: Path, device: torch.device | str = "cpu"):
    """The state saved at `path`; ValueError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(path, "pt") as f:
            skeleton = (f.metadata() or {}).get(KEY)
        tensors = load_file(path, device=str(device))
        if skeleton is None:
            raise ValueError(f"it has no {KEY!r} entry in its metadata")
        return _unpack(json.loads(skeleton), tensors)
    except (SafetensorError, ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable saex state ({e}); delete it to start over") from None


def _unpack(node, tensors: dict[str, torch.Tensor]):
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"malformed node {str(node)[:80]!r}")
    (kind, body), = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_unpack(v, tensors) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise ValueError(f"malformed node {str(node)[:80]!r}")
