"""The activation store's manifest: what was harvested, how, and which shards hold it."""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "saex-activations/1"
MANIFEST = "manifest.json"
ACTS_PREFIX = "acts."  # activation columns are named acts.<hook point>


def acts_column(hook: str) -> str:
    return ACTS_PREFIX + hook


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no activation store at {folder} ({MANIFEST} is missing); run `saex harvest` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}; this saex reads {FORMAT!r}")
    return manifest
