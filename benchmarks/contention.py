"""`saex train` steps on the CPU alone and beside busy processes: what sharing the cores costs.

Each setting trains a TopK SAE (d 384, 3,072 latents, batch 1,024, k 32: the shape of a MiniLM run) on
a synthetic store in a fresh process, once alone and once beside `--busy` processes that each spin a
core, and reports the median milliseconds per step from its log (the first steps left out).

    .venv/bin/python benchmarks/contention.py                      # the tuner and pinned threads, 1 busy process
    .venv/bin/python benchmarks/contention.py --settings default pinned active passive threads1 --busy 1

Settings: `default` (saex's thread tuner), `pinned` (torch's thread count throughout: `--threads` at the
core count, how saex ran before the tuner), `active` and `passive` (pinned, with OMP_WAIT_POLICY set),
`threads1` (one thread).
Prints JSON: ms per step for each setting, alone and shared, and the machine."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe  # benchmarks/machine.py, beside this script

PINNED = ["--threads", str(torch.get_num_threads())]
SETTINGS = {"default": ({}, []), "pinned": ({}, PINNED), "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, PINNED),
            "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, PINNED), "threads1": ({}, ["--threads", "1"])}


def make_store(folder: Path, rows: int, d: int) -> None:
    from saex.store import StoreWriter

    w = StoreWriter(folder, {"model": "synthetic", "hooks": ["blocks.0.hook_resid_post"], "tokens": "all",
                             "dataset": {"kind": "synthetic"}, "label_names": None}, shard_rows=16384)
    g = torch.Generator().manual_seed(0)
    for start in range(0, rows, 4096):
        w.add({"acts.blocks.0.hook_resid_post": torch.randn(4096, d, generator=g).to(torch.bfloat16),
               "example": torch.arange(start, start + 4096)}, [str(i) for i in range(start, start + 4096)])
    w.finish()


def ms_per_step(run: Path, name: str, setting: tuple[dict, list], steps: int, skip: int) -> float:
    env, extra = setting
    args = [sys.executable, "-m", "saex", "train", "--run", str(run), "--name", name, "--architecture", "topk",
            "--k", "32", "--d-sae", "3072", "--batch-size", "1024", "--steps", str(steps), "--log-every", "1",
            "--checkpoint-every", str(steps + 1), "--no-verify", "--overwrite", *extra]
    subprocess.run(args, env={**os.environ, **env}, check=True, capture_output=True)
    events = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    times = [e["time"] for e in events if e["event"] == "step"][-(steps - skip):]  # this run's last steps
    (run / "logs" / "train.jsonl").unlink()
    return 1000 * statistics.median(b - a for a, b in zip(times, times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["default", "pinned"], choices=sorted(SETTINGS))
    parser.add_argument("--busy", type=int, default=1, help="competing processes, each spinning a core")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        make_store(run / "acts", 65536, 384)
        for setting in args.settings:
            alone = ms_per_step(run, setting, SETTINGS[setting], args.steps, 10)
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
            try:
                time.sleep(0.5)
                shared = ms_per_step(run, setting, SETTINGS[setting], args.steps, 10)
            finally:
                for p in spinners:
                    p.kill()
            results[setting] = {"alone_ms": round(alone, 1), "shared_ms": round(shared, 1),
                                "slowdown": round(shared / alone, 2)}
            print(setting, results[setting], file=sys.stderr)
    print(json.dumps({"machine": describe("cpu"), "cores": os.cpu_count(), "busy_processes": args.busy,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
