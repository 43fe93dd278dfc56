"""The examples of a toy store (saex toy): one per row, with no input to show, since the activations
are generated, not computed from an image or a text."""

from __future__ import annotations

from saex.data.base import Example


class SyntheticRows:
    modality = "toy"
    label_names = None

    def __init__(self, rows: int | None = None):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows or 0

    def __getitem__(self, index: int) -> Example:
        return Example(int(index), f"row {int(index)}", None, -1)

    def describe(self) -> dict:
        return {"kind": "toy", "rows": self.rows}
