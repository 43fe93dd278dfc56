"""The activation store's manifest: what was harvested, how, and which shards hold it."""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "saex-activations/1"
MANIFEST = "manifest.json"
ACTS_PREFIX = "acts."  # activation columns are named acts.<hook point>
DTYPES = ("bfloat16", "float16", "float32", "float64", "int64", "int32", "int16", "uint8", "int8", "bool")


def acts_column(hook: str) -> str:
    return ACTS_PREFIX + hook


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no activation store at {folder} ({MANIFEST} is missing); run `saex harvest` first")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-harvest or restore it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} has format {found!r}; this saex reads {FORMAT!r}")
    problem = _schema_problem(manifest)
    if problem:
        raise ValueError(f"{path} is corrupt: {problem}; re-harvest or restore it")
    return manifest


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _schema_problem(m: dict) -> str | None:
    """What is wrong with a manifest's structure (None when nothing): the fields the readers rely on."""
    if not isinstance(m.get("shards"), list):
        return "'shards' must be a list"
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict):
            return f"shard entry {i} must be an object"
        file = s.get("file")
        if not isinstance(file, str) or not file or Path(file).name != file or file.startswith("."):
            return f"shard entry {i} has file {file!r}, which must be a plain file name in the store's folder"
        for key in ("rows", "examples", "first_example"):
            if key in s and not _is_int(s[key]):
                return f"shard {file} has {key}={s[key]!r}, which must be an integer >= 0"
        if "rows" not in s or not isinstance(s.get("sha256"), str):
            return f"shard {file} needs 'rows' and 'sha256'"
    if not _is_int(m.get("rows")) or m["rows"] != sum(s["rows"] for s in m["shards"]):
        return f"'rows' is {m.get('rows')!r} but the shards hold {sum(s['rows'] for s in m['shards'])} rows"
    if not isinstance(m.get("complete"), bool):
        return f"'complete' is {m.get('complete')!r}, which must be true or false"
    columns = m.get("columns")
    if columns is None:
        return "it lists shards but no columns" if m["shards"] else None
    if not isinstance(columns, dict) or not columns:
        return "'columns' must map column names to their dtype and shape"
    for name, spec in columns.items():
        if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES or not isinstance(spec.get("shape"), list) \
                or not all(_is_int(d) for d in spec["shape"]):
            return f"column {name!r} is {spec!r}; it must be {{'dtype': one of {list(DTYPES)}, 'shape': [int, ...]}}"
    return None
