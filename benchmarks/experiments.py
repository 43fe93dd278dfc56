"""What experiments on features cost on a demo run: one edit's effect (the explorer's edit page and
`saex edit` wait on it) and the index's ablation pass (`saex index` with and without it).

    .venv/bin/saex demo --no-serve --run runs/demo         # once: fmnist-vit, 10,000 images
    .venv/bin/python benchmarks/experiments.py --run runs/demo

Prints JSON: the model and SAE load time, each edit op's median and max seconds over --examples
examples (one torch thread, as the explorer and `saex edit` run them), and the index's seconds with
and without the ablation pass (on a copy of the run's index folder), with the machine."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe  # benchmarks/machine.py, beside this script


def effect_times(run: Path, examples: int) -> dict:
    from saex.analysis.edit import Edit
    from saex.analysis.experiment import Experiment

    start = time.perf_counter()
    exp = Experiment(run)
    load = time.perf_counter() - start
    refs = [str(int(e)) for e in exp.store.shard(0, "example")[:examples]]
    out = {"load_s": round(load, 2)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for op in ("none", "add", "zero", "copy", "pair"):
            times = []
            for i, ref in enumerate(refs):
                top = exp.effect(ref, [], neighbours=0)["active_before"][0]["feature"]
                other = refs[(i + 1) % len(refs)]
                edits = {"none": [], "add": [Edit("add", [top], 10.0)], "zero": [Edit("zero", [top])],
                         "copy": [Edit("copy", source=other)],
                         "pair": [Edit("pair", source=ref, target=other)]}[op]
                t = time.perf_counter()
                exp.effect(ref, edits, neighbours=8)
                times.append(time.perf_counter() - t)
            out[op] = {"median_s": round(statistics.median(times), 4), "max_s": round(max(times), 4)}
    finally:
        torch.set_num_threads(threads)
    return out


def index_times(run: Path) -> dict:
    from saex.explorer.index import IndexConfig, build_index

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "run"
        copy.mkdir()
        for part in ("acts", "saes"):
            (copy / part).symlink_to((run / part).resolve())
        for name, ablation in (("without_ablation_s", False), ("with_ablation_s", True)):
            start = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
                build_index(IndexConfig(run=str(copy), overwrite=True, ablation=ablation))
            out[name] = round(time.perf_counter() - start, 2)
        shutil.rmtree(copy / "index", ignore_errors=True)
    out["ratio"] = round(out["with_ablation_s"] / out["without_ablation_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--examples", type=int, default=20)
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "saes").exists():
        raise SystemExit(f"{run} has no trained SAE: build it with `saex demo --no-serve --run {run}`")
    print(json.dumps({"machine": describe("cpu"), "run": str(run), "effect": effect_times(run, args.examples),
                      "index": index_times(run)}, indent=2))


if __name__ == "__main__":
    main()
