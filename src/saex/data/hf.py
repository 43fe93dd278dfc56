"""Hugging Face datasets of images or text (the `hf` extra; needs the hub or a local copy)."""

from __future__ import annotations

from saex.data.base import Example, check_index

IMAGE_COLUMNS = ("image", "img", "jpg", "png")
TEXT_COLUMNS = ("text", "content", "sentence", "document")
LABEL_COLUMNS = ("label", "labels", "fine_label", "topic")


class HFDataset:
    def __init__(self, name: str, split: str = "train", text_field: str | None = None,
                 label_field: str | None = None, config: str | None = None):
        try:
            import datasets
        except ImportError as e:
            raise ImportError("Hugging Face datasets need the `hf` extra: pip install 'saex[hf]'") from e
        self.name, self.split, self.config = name, split, config
        self.ds = datasets.load_dataset(name, config, split=split)
        columns = self.ds.column_names
        image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
        text_col = text_field or next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_field and text_field not in columns:
            raise KeyError(f"dataset {name} has no column {text_field!r}; columns: {columns}")
        if image_col is None and text_col is None:
            raise ValueError(f"dataset {name} has no image column {IMAGE_COLUMNS} nor text column "
                             f"{TEXT_COLUMNS}; columns: {columns}; set --text-field")
        self.modality = "image" if image_col and not text_field else "text"
        self.input_col = image_col if self.modality == "image" else text_col
        self.label_col = label_field or next((c for c in LABEL_COLUMNS if c in columns), None)
        feature = self.ds.features.get(self.label_col) if self.label_col else None
        self.label_names = list(getattr(feature, "names", None) or []) or None
        self.text_field, self.label_field = text_field, label_field

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Example:
        i = check_index(index, len(self))
        row = self.ds[i]
        x = row[self.input_col]
        if self.modality == "image":
            x = x.convert("RGB")
        label = row.get(self.label_col, -1) if self.label_col else -1
        return Example(i, f"{self.split}/{i}", x, int(label) if isinstance(label, int) else -1)

    def describe(self) -> dict:
        return {"kind": "hf", "path": self.name, "split": self.split, "config": self.config,
                "text_field": self.text_field, "label_field": self.label_field}
