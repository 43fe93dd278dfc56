"""Plain text (one example per non-empty line) and JSONL (one example per record) files."""

from __future__ import annotations

import json
from pathlib import Path

from saex.data.base import Example, check_index


class TextFile:
    modality = "text"

    def __init__(self, path: str | Path, text_field: str = "text", label_field: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"text file {self.path} does not exist")
        self.text_field, self.label_field = text_field, label_field
        texts, labels = [], []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if self.path.suffix == ".jsonl":
                    record = json.loads(line)
                    if text_field not in record:
                        raise KeyError(f"{self.path}:{lineno} has no field {text_field!r} "
                                       f"(fields: {sorted(record)}); set --text-field")
                    texts.append((lineno, str(record[text_field])))
                    labels.append(record.get(label_field) if label_field else None)
                else:
                    texts.append((lineno, line.rstrip("\n")))
                    labels.append(None)
        if not texts:
            raise ValueError(f"{self.path} holds no text")
        self.texts = texts
        names = sorted({str(x) for x in labels if x is not None})
        self.label_names = names or None
        index = {n: i for i, n in enumerate(names)}
        self.labels = [index[str(x)] if x is not None else -1 for x in labels]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Example:
        i = check_index(index, len(self))
        lineno, text = self.texts[i]
        return Example(i, f"{self.path.name}:{lineno}", text, self.labels[i])

    def describe(self) -> dict:
        return {"kind": "textfile", "path": str(self.path), "text_field": self.text_field,
                "label_field": self.label_field}
