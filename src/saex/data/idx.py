"""Fashion-MNIST (and MNIST-style) IDX files, gzipped or not."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from saex.data.base import BadDataFile, Example, check_index

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
DEBIAN_PACKAGE = "dataset-fashion-mnist"


def read_idx(path: Path, layout: tuple[str, ...] | None = None) -> np.ndarray:
    """The array in an IDX file of unsigned bytes (gzipped when its name ends in .gz); with `layout` (the
    names of its dimensions), an array of that many dimensions."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise BadDataFile(path, f"the gzip stream is broken or cut short ({e}); expected a gzipped IDX file "
                                "(or an uncompressed one, without .gz in its name)") from e
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        magic = data[:4].hex() or "missing"
        raise BadDataFile(path, f"not an IDX file of unsigned bytes: its magic number is {magic}, expected 000008 "
                                "followed by the number of dimensions (e.g. 00000803)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise BadDataFile(path, f"cut short: its header announces {data[3]} dimensions ({header} bytes) but the "
                                f"file has {len(data)} bytes")
    shape = tuple(int.from_bytes(data[i: i + 4], "big") for i in range(4, header, 4))
    if layout is not None and len(shape) != len(layout):
        raise BadDataFile(path, f"holds an array of shape {shape}; expected one of shape [{', '.join(layout)}]")
    if len(data) - header != int(np.prod(shape)):
        raise BadDataFile(path, f"holds {len(data) - header} bytes of data but its header says shape {shape} "
                                f"({int(np.prod(shape))} bytes); the file is cut short or is not one IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_fashion_mnist() -> Path:
    """The folder of Debian's dataset-fashion-mnist package."""
    candidates = [Path("/usr/share/datasets/fashion-mnist")]
    if shutil.which("dpkg"):
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True)
        candidates += [Path(p).parent for p in out.stdout.splitlines() if p.endswith("idx3-ubyte.gz")]
    for folder in candidates:
        if _idx_file(folder, "train", "images"):
            return folder
    raise FileNotFoundError(
        "Fashion-MNIST not found: install it with `apt-get install dataset-fashion-mnist` "
        "(or `make setup`), or pass --data-path FOLDER holding train-images-idx3-ubyte[.gz]"
    )


def _idx_file(folder: Path, split: str, kind: str) -> Path | None:
    idx = "idx3" if kind == "images" else "idx1"
    for name in (f"{SPLIT_PREFIX[split]}-{kind}-{idx}-ubyte.gz", f"{SPLIT_PREFIX[split]}-{kind}-{idx}-ubyte"):
        if (folder / name).exists():
            return folder / name
    return None


def is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and _idx_file(folder, "train", "images") is not None


class IdxImages:
    """28x28 greyscale images with labels from a folder of IDX files."""

    modality = "image"

    def __init__(self, folder: str | Path | None = None, split: str = "train", label_names=None):
        if split not in SPLIT_PREFIX:
            raise ValueError(f"split {split!r} is not one of {sorted(SPLIT_PREFIX)}")
        self.folder = Path(folder) if folder else find_fashion_mnist()
        images, labels = _idx_file(self.folder, split, "images"), _idx_file(self.folder, split, "labels")
        if images is None or labels is None:
            raise FileNotFoundError(f"no {split} IDX images and labels in {self.folder}")
        self.split = split
        self.images = read_idx(images, ("images", "height", "width"))
        self.labels = read_idx(labels, ("labels",)).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{images} has {len(self.images)} images but {labels} has {len(self.labels)} labels")
        self.label_names = label_names or FASHION_MNIST_LABELS

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Example:
        i = check_index(index, len(self))
        return Example(i, f"{self.split}/{i:05d}", Image.fromarray(self.images[i]), int(self.labels[i]))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images [N, 28, 28] uint8 and labels [N] at once, for fast training loops."""
        return self.images, self.labels

    def describe(self) -> dict:
        return {"kind": "idx", "path": str(self.folder), "split": self.split}
