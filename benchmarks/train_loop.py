"""Tokens/s of `saex train` end to end (the shuffled stream from the store, the step, dead-latent
tracking, logging) against the bare training step of the same SAE, on a synthetic activation store.
The gap is what the loop around the step costs.

    .venv/bin/python benchmarks/train_loop.py                 # 2-CPU shape: d 384, 6,144 latents, batch 1,024
    .venv/bin/python benchmarks/train_loop.py --shape h100    # d 1,024, 65,536 latents, batch 4,096 (a GPU)

Prints JSON: both rates, their ratio and the machine."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe  # benchmarks/machine.py, beside this script

SHAPES = {"cpu": (384, 6144, 1024), "h100": (1024, 65536, 4096)}  # d_in, latents, batch


def bare_step_rate(d: int, S: int, B: int, arch: str, k: int, device: torch.device, steps: int) -> float:
    """Tokens/s of the SAE's step alone (as benchmarks/train_step.py times it) on resident data."""
    from saex.sae import SAE, SAEConfig
    from saex.sae.arch import TrainContext
    from saex.sae.kernels.precision import native_bfloat16
    from saex.train.optim import make_adam

    sae = SAE(SAEConfig(d_in=d, d_sae=S, k=k, architecture=arch)).to(device)
    opt = make_adam(sae.parameters(), 1e-4)
    x = torch.randn(B, d, device=device)
    ctx = TrainContext()

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=native_bfloat16(device)):  # as the trainer
            loss = sae.train_forward(x, ctx).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * B / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--architecture", default="topk")
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="training steps timed (after the loop's start)")
    parser.add_argument("--rows", type=int, default=None, help="store rows (default: 64 batches)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from saex.train import TrainConfig, train
    from tests.train.synthetic import write_store

    d, S, B = SHAPES[args.shape]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = args.rows or 64 * B
        write_store(Path(tmp) / "acts", torch.randn(rows, d), shard_rows=65536)
        train(TrainConfig(run=tmp, architecture=args.architecture, k=args.k, expansion=S // d, batch_size=B,
                          steps=args.steps, log_every=args.steps, checkpoint_every=10 * args.steps))
        end = [json.loads(line) for line in (Path(tmp) / "logs" / "train.jsonl").read_text().splitlines()][-1]
    bare = bare_step_rate(d, S, B, args.architecture, args.k, device, min(args.steps, 50))
    print(json.dumps({"device": describe(device),
                      "shape": {"d_in": d, "d_sae": S, "batch": B, "k": args.k}, "architecture": args.architecture,
                      "train_tokens_per_s": round(end["tokens_per_s"]), "bare_step_tokens_per_s": round(bare),
                      "ratio": round(end["tokens_per_s"] / bare, 3)}, indent=2))


if __name__ == "__main__":
    main()
