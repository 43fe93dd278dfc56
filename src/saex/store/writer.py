"""Writes an activation store shard by shard; a killed writer resumes at the last complete shard.

The manifest is the source of truth: a shard counts once the manifest lists it. Shards close at the
boundaries of the batches they are given, so a resumed harvest sees exactly the batches it would have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from saex.atomic import atomic_write_json
from saex.store.files import atomic_save_tensors
from saex.store.manifest import FORMAT, MANIFEST, load_manifest


class StoreMismatch(ValueError):
    pass


class StoreWriter:
    def __init__(self, folder: str | Path, header: dict, shard_rows: int = 65536, overwrite: bool = False):
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.folder = Path(folder)
        self.shard_rows = shard_rows
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if (self.folder / MANIFEST).exists():
            self.manifest = load_manifest(self.folder)
            diffs = {k: (self.manifest.get(k), v) for k, v in header.items() if self.manifest.get(k) != v}
            if diffs:
                lines = "; ".join(f"{k}: store has {old!r}, asked for {new!r}" for k, (old, new) in diffs.items())
                raise StoreMismatch(f"{self.folder} holds other activations ({lines}); "
                                    "use another run folder, or --overwrite to replace them")
        else:
            self.manifest = {"format": FORMAT, **header, "columns": None, "rows": 0, "examples": 0,
                             "complete": False, "shards": [], "skipped": []}
        self._remove_orphans()
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self._pending_examples = 0
        self._pending_ids: list[str] = []
        self._pending_skipped: list[dict] = []

    @property
    def examples_done(self) -> int:
        """Examples already in complete shards: where a resumed harvest starts."""
        return self.manifest["examples"]

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    def _remove_orphans(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in self.folder.iterdir():
            if (p.name.startswith("shard_") and p.name not in listed) or p.name.endswith(".tmp"):
                p.unlink()

    def _check_columns(self, columns: dict[str, torch.Tensor]) -> None:
        spec = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])} for k, v in columns.items()}
        if self.manifest["columns"] is None:
            self.manifest["columns"] = spec
        elif self.manifest["columns"] != spec:
            raise StoreMismatch(f"columns {spec} differ from the store's {self.manifest['columns']}")
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different row counts: { {k: len(v) for k, v in columns.items()} }")

    def add(self, columns: dict[str, torch.Tensor], example_ids: list[str], skipped: list[dict] = ()) -> None:
        """Rows from one batch of examples (`example_ids` in order; `skipped` were unreadable)."""
        if self.complete:
            raise RuntimeError(f"{self.folder} is complete; nothing more can be added")
        self._check_columns(columns)
        self._pending.append({k: v.detach().cpu() for k, v in columns.items()})
        self._pending_rows += len(next(iter(columns.values())))
        self._pending_examples += len(example_ids) + len(skipped)
        self._pending_ids += example_ids
        self._pending_skipped += list(skipped)
        if self._pending_rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending_examples:
            return
        name = f"shard_{len(self.manifest['shards']):06d}.safetensors"
        tensors = {k: torch.cat([p[k] for p in self._pending]) for k in self._pending[0]}
        sha = atomic_save_tensors(self.folder / name, tensors, {"example_ids": json.dumps(self._pending_ids)})
        m = self.manifest
        m["shards"].append({"file": name, "rows": self._pending_rows, "first_example": m["examples"],
                            "examples": self._pending_examples, "sha256": sha})
        m["rows"] += self._pending_rows
        m["examples"] += self._pending_examples
        m["skipped"] += self._pending_skipped
        atomic_write_json(self.folder / MANIFEST, m)
        self._pending, self._pending_rows, self._pending_examples = [], 0, 0
        self._pending_ids, self._pending_skipped = [], []

    def finish(self, **extra) -> dict:
        """Write the last shard and mark the store complete; `extra` goes into the manifest."""
        self.flush()
        self.manifest.update(extra, complete=True)
        atomic_write_json(self.folder / MANIFEST, self.manifest)
        return self.manifest
