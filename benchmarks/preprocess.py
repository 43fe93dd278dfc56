"""Milliseconds per image of the image processors' two backends (PIL, torchvision) doing harvest's CPU
share of preprocessing (decode, resize, crop; rescale and normalise happen on the model's device), on
JPEGs of a given size, in one process with one thread, as a DataLoader worker runs it.

    .venv/bin/python benchmarks/preprocess.py --size 500x375"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="500x375", help="JPEG width x height (ImageNet's typical size)")
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args()
    import transformers as T

    torch.set_num_threads(1)
    w, h = map(int, args.size.split("x"))
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)  # photo-like: low-frequency content
    jpegs = []
    for _ in range(args.images):
        buf = io.BytesIO()
        noise = rng.integers(-12, 12, (h, w, 3))
        base = np.asarray(Image.fromarray(smooth).resize((w, h), Image.BICUBIC), dtype=np.int64)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    t = time.perf_counter()
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    report = {"size": args.size, "decode_ms": round(1000 * (time.perf_counter() - t) / len(jpegs), 2)}
    with tempfile.TemporaryDirectory() as tmp:
        T.CLIPImageProcessor().save_pretrained(tmp)
        for backend in ("pil", "torchvision"):
            try:
                proc = T.AutoImageProcessor.from_pretrained(tmp, backend=backend)
            except Exception as e:  # torchvision missing, or a transformers without backends
                report[backend] = repr(e)[:120]
                continue
            seconds = []
            for _ in range(3):  # the fastest of three passes
                t = time.perf_counter()
                proc(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)
                seconds.append(time.perf_counter() - t)
            report[backend] = {"class": type(proc).__name__,
                               "ms_per_image": round(1000 * min(seconds) / len(images), 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
