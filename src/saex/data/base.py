"""What every dataset yields: examples with stable ids, an input and a label."""

from __future__ import annotations

from dataclasses import dataclass
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
