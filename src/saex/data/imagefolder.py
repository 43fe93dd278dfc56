"""Images in the ImageFolder layout: root/<label>/<image>; labels from sub-folder names."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from saex.data.base import Example, UnreadableExample, check_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageFolder:
    """Every image under `root`, sorted by path; labelled by its first sub-folder when there are any."""

    modality = "image"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.root}")
        classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths if len(p.relative_to(self.root).parts) > 1})
        self.label_names = classes or None
        self._label = {c: i for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        i = check_index(index, len(self))
        rel = self.paths[i].relative_to(self.root)
        label = self._label.get(rel.parts[0], -1) if len(rel.parts) > 1 else -1
        try:
            with Image.open(self.paths[i]) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise UnreadableExample(str(self.paths[i]), str(e)) from e
        return Example(i, rel.as_posix(), image, label)

    def describe(self) -> dict:
        return {"kind": "imagefolder", "path": str(self.root)}
