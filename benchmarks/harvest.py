"""Images/s of `saex harvest` against a plain transformers forward with output_hidden_states, on a
randomly initialised CLIP vision tower (ViT-L/14 by default; random weights cost the same as real ones).

    .venv/bin/python benchmarks/harvest.py                       # ViT-L/14, layer 22, 2,048 images (a GPU)
    .venv/bin/python benchmarks/harvest.py --size tiny --images 256   # a quick check of the script on a CPU

Prints JSON: both rates and their ratio (target: harvest >= 90 % of the plain forward)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/machine.py, beside this script
from PIL import Image

SIZES = {  # hidden, layers, heads, mlp, patch
    "l14": (1024, 24, 16, 4096, 14),
    "tiny": (64, 4, 4, 128, 16),
}


def build_model(folder: Path, size: str) -> None:
    import transformers as T

    hidden, layers, heads, mlp, patch = SIZES[size]
    config = T.CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=mlp, patch_size=patch, image_size=224)
    T.CLIPVisionModel(config).save_pretrained(folder)
    T.CLIPImageProcessor().save_pretrained(folder)


def _write(folder: Path, start: int, stop: int) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")


def write_images(folder: Path, n: int) -> None:
    """n noise JPEGs of 256 x 256 pixels, written by all cores."""
    (folder / "noise").mkdir(parents=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write, repeat(folder / "noise"), range(0, n, 512), [min(n, s + 512) for s in range(0, n, 512)]))


@torch.inference_mode()
def plain_forward(model_dir: Path, n: int, batch: int, device: str) -> float:
    import transformers as T

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = T.CLIPVisionModel.from_pretrained(model_dir).to(device, dtype).eval()
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    model(pixel_values=pixels, output_hidden_states=True)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        model(pixel_values=pixels, output_hidden_states=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return max(1, n // batch) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="l14")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layer", type=int, default=None, help="hooked block (default: second to last)")
    parser.add_argument("--workers", type=int, default=-1, help="harvest's loader processes (-1: its default)")
    args = parser.parse_args()
    from saex.harvest import HarvestConfig, harvest

    device = "cuda" if torch.cuda.is_available() else "cpu"
    layer = SIZES[args.size][1] - 2 if args.layer is None else args.layer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model", args.size)
        write_images(tmp / "images", args.images)
        forward = plain_forward(tmp / "model", args.images, args.batch_size, device)
        def run(name, limit=None):
            return harvest(HarvestConfig(run=str(tmp / name), model=str(tmp / "model"), dataset=str(tmp / "images"),
                                         hook=[f"blocks.{layer}.hook_resid_post"], tokens="cls", max_examples=limit,
                                         batch_size=args.batch_size, order="dataset", workers=args.workers))

        run("warm-up", limit=args.batch_size)  # one batch, as the plain forward's warm-up call
        manifest = run("run")
        end = json.loads((tmp / "run" / "logs" / "harvest.jsonl").read_text().splitlines()[-1])
    print(json.dumps({"device": describe(device), "size": args.size,
                      "layer": layer, "images": args.images, "batch_size": args.batch_size, "workers": args.workers,
                      "plain_forward_images_per_s": round(forward, 1),
                      "harvest_images_per_s": round(end["examples_per_s"], 1),
                      "ratio": round(end["examples_per_s"] / forward, 3), "rows": manifest["rows"]}, indent=2))


if __name__ == "__main__":
    main()
