"""fmnist-vit: a small ViT classifier that saex trains on Fashion-MNIST in a few CPU minutes.

It is the vision default: small enough to harvest and splice on a laptop, real enough that its
features mean something (>= 85 % test accuracy).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saex.data.idx import FASHION_MNIST_LABELS, IdxImages

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics (train split, pixels in [0, 1])


@dataclass
class FmnistVitRecipe:
    """How fmnist-vit is trained; the defaults reproduce the shipped weights."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    mlp_size: int = 256
    patch_size: int = 7
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0


def build(recipe: FmnistVitRecipe):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=28, patch_size=recipe.patch_size, num_channels=1,
        hidden_size=recipe.hidden_size, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, intermediate_size=recipe.mlp_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=len(FASHION_MNIST_LABELS),
        id2label=dict(enumerate(FASHION_MNIST_LABELS)),
        label2id={n: i for i, n in enumerate(FASHION_MNIST_LABELS)},
    )
    return ViTForImageClassification(config)


def image_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=False, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=[MEAN], image_std=[STD])


def _tensor(images: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(images).float() / 255 - MEAN) / STD).unsqueeze(1)


@torch.no_grad()
def accuracy(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(pixel_values=_tensor(images[i:i + batch_size])).logits
        correct += (logits.argmax(-1).numpy() == labels[i:i + batch_size]).sum()
    return float(correct) / len(images)


def train(out: Path, recipe: FmnistVitRecipe | None = None, data_path: str | None = None,
          log=print) -> dict:
    """Train fmnist-vit and save it (config, weights, image processor) in `out`, atomically."""
    from saex.atomic import atomic_folder

    recipe = recipe or FmnistVitRecipe()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    train_x, train_y = IdxImages(data_path, "train").arrays()
    test_x, test_y = IdxImages(data_path, "test").arrays()
    model = build(recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = len(train_x) // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    warmup = total // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start = time.perf_counter()
    bar = tqdm(total=total, desc="fmnist-vit", unit="step")
    for epoch in range(recipe.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        for s in range(steps_per_epoch):
            idx = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
            x = _tensor(train_x[idx])
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x[flip] = x[flip].flip(-1)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.from_numpy(train_y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    result = {"test_accuracy": accuracy(model, test_x, test_y), "train_seconds": time.perf_counter() - start,
              "recipe": recipe.__dict__}
    log(f"fmnist-vit: test accuracy {result['test_accuracy']:.4f} after {result['train_seconds']:.0f} s")
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        image_processor().save_pretrained(tmp)
        (tmp / "training.json").write_text(__import__("json").dumps(result, indent=2))
    return result
