"""Fashion-MNIST (and MNIST-style) IDX files, gzipped or not."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from saex.data.base import Example, check_index

FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
DEBIAN_PACKAGE = "dataset-fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {arr.size} bytes but its header says shape {shape}")
    return arr.reshape(shape)


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
        self.images = read_idx(images)
        self.labels = read_idx(labels).astype(np.int64)
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
