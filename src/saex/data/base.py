"""What every dataset yields: examples with stable ids, an input and a label."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

Modality = Literal["image", "text"]


@dataclass(frozen=True)
class Example:
    index: int  # position in the dataset's stable order; what the activation store records
    id: str  # stable human-readable id: a file path, "train/00012", an article title
    input: Any  # a PIL image or a string
    label: int = -1  # index into the dataset's label names; -1 when unlabelled


class UnreadableExample(ValueError):
    """An example whose input cannot be decoded (a corrupt image, say); harvest skips and reports it."""

    def __init__(self, example_id: str, reason: str):
        super().__init__(f"cannot read {example_id}: {reason}")
        self.example_id = example_id
        self.reason = reason


class Dataset(Protocol):
    modality: Modality
    label_names: list[str] | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...

    def describe(self) -> dict:
        """A JSON-able description that `saex.data.open_dataset` reopens to the same examples."""
        ...


def check_index(index: int, length: int) -> int:
    if not -length <= index < length:
        raise IndexError(f"example index {index} is out of range for a dataset of {length} examples")
    return index % length


class BadDataFile(ValueError):
    """A data file that is not what its loader reads; the message names the file (and the line), what is
    wrong and what would be valid."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None):
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line = Path(path), line


def read_text(path: str | Path) -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped); invalid bytes name their line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        raise BadDataFile(path, f"byte {data[e.start]:#04x} at column {e.start - line_start + 1} is not UTF-8 "
                                f"({e.reason}); the file must be UTF-8 text (convert it, e.g. with iconv -t UTF-8)",
                          data.count(b"\n", 0, e.start) + 1) from e


def parse_json(text: str, path: str | Path, expected: str, first_line: int = 1) -> Any:
    """json.loads whose errors name the file and the real line there (`text` begins at `first_line`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadDataFile(path, f"invalid JSON at column {e.colno} ({e.msg}); {expected}",
                          first_line + e.lineno - 1) from e


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}
