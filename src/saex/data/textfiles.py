"""Plain text (one example per non-empty line) and JSONL (one example per record) files."""

from __future__ import annotations

import io
from pathlib import Path

from saex.data.base import JSON_TYPES, BadDataFile, Example, check_index, parse_json, read_text

JSONL_RECORD = 'each non-empty line of a .jsonl file must be one JSON object, e.g. {"text": "...", "label": "..."}'


class TextFile:
    modality = "text"

    def __init__(self, path: str | Path, text_field: str = "text", label_field: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"text file {self.path} does not exist")
        self.text_field, self.label_field = text_field, label_field
        texts, labels = [], []
        for lineno, line in enumerate(io.StringIO(read_text(self.path), newline=None), 1):
            if not line.strip():
                continue
            if self.path.suffix == ".jsonl":
                record = parse_json(line, self.path, JSONL_RECORD, lineno)
                texts.append((lineno, self._text(record, lineno)))
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

    def _text(self, record, lineno: int) -> str:
        if not isinstance(record, dict):
            raise BadDataFile(self.path, f"the record is {JSON_TYPES[type(record)]}; {JSONL_RECORD}", lineno)
        if self.text_field not in record:
            raise BadDataFile(self.path, f"the record has no field {self.text_field!r} (fields: {sorted(record)}); "
                                         "set --text-field to the one holding the text", lineno)
        text = record[self.text_field]
        if not isinstance(text, str):
            raise BadDataFile(self.path, f"field {self.text_field!r} is {JSON_TYPES[type(text)]}, not a string; "
                                         "set --text-field to the one holding the text", lineno)
        return text

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Example:
        i = check_index(index, len(self))
        lineno, text = self.texts[i]
        return Example(i, f"{self.path.name}:{lineno}", text, self.labels[i])

    def describe(self) -> dict:
        return {"kind": "textfile", "path": str(self.path), "text_field": self.text_field,
                "label_field": self.label_field}
