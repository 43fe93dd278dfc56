"""Every architecture on a toy store with known true features, at matched L0: MCC, F1, absorption, FVU.

Usage (docs/architectures.md, "On ground truth"):
  .venv/bin/python benchmarks/ground_truth_table.py --preset small --out /tmp/gt/small-table
  .venv/bin/python benchmarks/ground_truth_table.py --preset synthsaebench-16k --store /tmp/gt/ssb16k \
      --rows 400000 --out /tmp/gt/ssb16k-table

TopK, BatchTopK and both Matryoshka variants (BatchTopK with nested prefix losses) get k = the target L0.
The penalised architectures (ReLU with the April-2024 L1, JumpReLU, Gated, ProLU) get no k, so their
sparsity coefficient is calibrated: short runs (a fraction of the row budget) searched on log lambda
(a log-log secant inside a bracket), a full run at the estimate, and up to --refine more full runs
corrected from the full run's own L0, since a short run's L0 is not the long run's. The table says the
L0 each one reached; every run is seeded, so a --rows budget gives the same table twice on one machine.

The store (OUT/run/acts links to --store/acts) is written by `saex toy` when it is missing. Results are
appended to OUT/results.json as each architecture ends: a rerun skips the ones already there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from saex.atomic import atomic_write_bytes, atomic_write_json
from saex.eval.run import EvalConfig, evaluate
from saex.sae.io import load_sae
from saex.toy import load_toy
from saex.train.config import TrainConfig
from saex.train.loop import train

PRESET_DEFAULTS = {"small": {"d_sae": 256, "target_l0": 5.0}, "synthsaebench-16k": {"d_sae": 4096, "target_l0": 25.0}}
# SynthSAEBench-16k, L0 25, 4,096 latents, 200M samples: (F1, MCC) as the issue quotes them
REFERENCE = {"batchtopk": (0.732, 0.757), "matryoshka-fixed": (0.879, 0.793), "matryoshka-random": (0.879, 0.793),
             "jumprelu": (0.732, 0.753), "relu": (0.556, 0.604)}
REFERENCE_SAMPLES = 200_000_000
CALIBRATE_SEED = 12345  # the calibration's L0 rows: fresh rows of the toy, apart from eval's
# name: (TrainConfig overrides, starting lambda or None for a fixed k, settings for the table)
ARCHITECTURES = {
    "relu": ({"architecture": "relu", "l1_variant": "april"}, 5.0, "L1 (April 2024: decoder-norm weighted)"),
    "topk": ({"architecture": "topk"}, None, "k {k}"),
    "batchtopk": ({"architecture": "batchtopk"}, None, "k {k}"),
    "jumprelu": ({"architecture": "jumprelu"}, 3.0, "L0 penalty, thresholds start at L0 {k}"),
    "gated": ({"architecture": "gated"}, 5.0, "L1 on the gate"),
    "prolu": ({"architecture": "prolu", "prolu_grad": "ste"}, 5.0, "L1, STE gradients"),
    "matryoshka-fixed": ({"architecture": "batchtopk", "matryoshka": "fixed"}, None,
                         "BatchTopK k {k}, groups 1/16,1/16,1/8,1/4,1/2"),
    "matryoshka-random": ({"architecture": "batchtopk", "matryoshka": "random"}, None,
                          "BatchTopK k {k}, 10 random prefixes"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESET_DEFAULTS), default="synthsaebench-16k", help="saex toy preset")
    p.add_argument("--store", type=Path, help="toy run folder holding acts/ (default: OUT/store; made when missing)")
    p.add_argument("--out", type=Path, required=True, help="output folder: run/, results.json, table.md, plot")
    p.add_argument("--d-sae", type=int, help="latents (default: 4096 for synthsaebench-16k, 256 for small)")
    p.add_argument("--target-l0", type=float, help="L0 to match (default: 25 for synthsaebench-16k, 5 for small)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--rows", type=int, help="training rows per architecture (deterministic; default 200,000)")
    budget.add_argument("--minutes", type=float, help="training minutes per architecture, from a measured rate")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--architectures", nargs="+", choices=list(ARCHITECTURES), default=list(ARCHITECTURES))
    p.add_argument("--calibration-fraction", type=float, default=0.25, help="a calibration run's share of the rows")
    p.add_argument("--calibration-runs", type=int, default=4, help="most short runs per calibrated architecture")
    p.add_argument("--refine", type=int, default=1, help="most extra full runs when a full run misses the L0")
    p.add_argument("--tolerance", type=float, default=0.1, help="relative L0 error that counts as matched")
    p.add_argument("--eval-examples", type=int, default=20000, help="fresh toy rows for saex eval")
    p.add_argument("--threads", type=int, default=0, help="saex train --threads (0: adaptive)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in PRESET_DEFAULTS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rows is None and args.minutes is None:
        args.rows = 200_000
    if (args.rows is not None and args.rows < args.batch_size) or args.d_sae < 1 or args.target_l0 <= 0:
        raise ValueError(f"need rows >= batch size, d_sae >= 1, target L0 > 0; got {args.rows}, {args.d_sae}, "
                         f"{args.target_l0}")
    return args


def prepare_run(args) -> Path:
    """OUT/run with acts/ linked to the toy store (written by saex toy when it is missing)."""
    store = args.store or args.out / "store"
    if not (store / "acts" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "saex", "toy", "--run", str(store), "--preset", args.preset], check=True)
    run = args.out / "run"
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "acts").exists():
        os.symlink((store / "acts").resolve(), run / "acts")
    return run


def train_one(args, run: Path, name: str, overrides: dict, steps: int) -> tuple[Path, float, float]:
    """(folder, seconds, rows/s) of one seeded training run into run/saes/name."""
    cfg = TrainConfig(run=str(run), name=name, d_sae=args.d_sae, steps=steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, threads=args.threads, overwrite=True, verify=False,
                      checkpoint_every=steps + 1, log_every=max(25, steps // 20), **overrides)
    t0 = time.perf_counter()
    folder = train(cfg)[0]
    seconds = time.perf_counter() - t0
    return folder, seconds, steps * args.batch_size / seconds


def measure_l0(folder: Path, x_ND: torch.Tensor) -> float:
    """Mean active latents per row of the saved SAE on fixed toy rows (its inference code, as eval sees it)."""
    sae = load_sae(folder, "cpu")
    with torch.no_grad():
        return float(torch.cat([sae.encode(x).l0().float() for x in x_ND.split(4096)]).mean())


def next_lambda(points: list[tuple[float, float]], target: float) -> float:
    """The next lambda to try: a log-log secant inside the bracket of the points around the target, or
    a step from the nearest point with the steepest plausible slope when all lie on one side."""
    above = [(lam, l0) for lam, l0 in points if l0 > target]  # too dense: lambda too small
    below = [(lam, l0) for lam, l0 in points if l0 <= target]
    log = lambda v: math.log(max(v, 1e-3))  # noqa: E731 (an SAE with L0 0 still gives a point)
    if above and below:
        (a, la), (b, lb) = max(above), min(below)
        t = (log(la) - log(target)) / max(log(la) - log(lb), 1e-9)
        t = min(max(t, 0.15), 0.85)  # keep inside: a secant on a curved line can stall at one end
        return math.exp(log(a) + t * (log(b) - log(a)))
    lam, l0 = max(points) if above else min(points)  # step on from the last lambda in the right direction
    slope = 1.0  # L0 ~ lambda^-slope; a steep prior takes small, safe steps
    if len(points) >= 2:
        (l1, m1), (l2, m2) = sorted(points)[:2] if below else sorted(points)[-2:]
        if abs(log(l2) - log(l1)) > 1e-9 and abs(log(m2) - log(m1)) > 1e-9:
            slope = min(max(-(log(m2) - log(m1)) / (log(l2) - log(l1)), 0.3), 3.0)
    factor = math.exp((log(l0) - log(target)) / slope)
    return lam * min(max(factor, 1 / 16), 16.0)


def unresponsive(points: list[tuple[float, float]]) -> bool:
    """Lambdas 8x apart that give L0s within 5% of each other, both on the same side of the target: at
    this budget the penalty does not move L0 (JumpReLU: Adam moves a threshold by about lr per step)."""
    (a, la), (b, lb) = min(points), max(points)
    return b >= 8 * a and abs(math.log(max(lb, 1e-3) / max(la, 1e-3))) < math.log(1.05)


def calibrate(args, run: Path, name: str, overrides: dict, lam0: float, steps: int, x_ND) -> dict:
    """Short runs at a fraction of the steps until the L0 is within tolerance: the points and the estimate."""
    short = max(20, round(steps * args.calibration_fraction))
    points, seconds, lam = [], 0.0, lam0
    for i in range(args.calibration_runs):
        folder, s, _ = train_one(args, run, f"calibrate-{name}", {**overrides, "sparsity_coefficient": lam}, short)
        points.append((lam, measure_l0(folder, x_ND)))
        seconds += s
        shutil.rmtree(folder)
        print(f"  calibrate {name}: lambda {lam:.4g} -> L0 {points[-1][1]:.2f} ({short} steps)", flush=True)
        if abs(math.log(max(points[-1][1], 1e-3) / args.target_l0)) < math.log1p(args.tolerance):
            break
        if unresponsive(points):
            print(f"  calibrate {name}: L0 does not follow lambda at this budget; the largest lambda is kept")
            return {"points": points, "lambda": max(points)[0], "steps": short, "seconds": seconds,
                    "unresponsive": True}
        lam = next_lambda(points, args.target_l0)
    best = min(points, key=lambda p: abs(math.log(max(p[1], 1e-3) / args.target_l0)))
    estimate = best[0] if abs(math.log(max(best[1], 1e-3) / args.target_l0)) < math.log1p(args.tolerance) else lam
    return {"points": points, "lambda": estimate, "steps": short, "seconds": seconds}


def run_architecture(args, run: Path, name: str, x_ND) -> dict:
    overrides, lam0, settings = ARCHITECTURES[name]
    k = max(1, round(args.target_l0))
    overrides = dict(overrides)
    if lam0 is None:
        overrides["k"] = k
    if name == "jumprelu":
        overrides["jumprelu_init_l0"] = k
    steps = args.rows // args.batch_size if args.rows else None
    probe = {}
    if steps is None:  # --minutes: the rate of a short run of this architecture sets the steps
        _, s, rate = train_one(args, run, f"probe-{name}", {**overrides, "sparsity_coefficient": lam0 or 1.0}, 30)
        shutil.rmtree(run / "saes" / f"probe-{name}")
        steps = max(1, int(args.minutes * 60 * rate / args.batch_size))
        probe = {"probe_rows_per_s": rate, "probe_seconds": s}
    calibration, full_runs = None, []
    if lam0 is not None:
        calibration = calibrate(args, run, name, overrides, lam0, steps, x_ND)
        lam = calibration["lambda"]
        for attempt in range(0 if calibration.get("unresponsive") else args.refine, -1, -1):
            folder, seconds, rate = train_one(args, run, name, {**overrides, "sparsity_coefficient": lam}, steps)
            l0 = measure_l0(folder, x_ND)
            full_runs.append({"lambda": lam, "l0": l0, "seconds": seconds})
            print(f"  full {name}: lambda {lam:.4g} -> L0 {l0:.2f} ({steps} steps, {seconds / 60:.1f} min)", flush=True)
            if abs(math.log(max(l0, 1e-3) / args.target_l0)) < math.log1p(args.tolerance) or attempt == 0:
                break
            # the full run's L0 against the short runs' curve: move lambda by the calibration's slope
            lam = (next_lambda([(r["lambda"], r["l0"]) for r in full_runs], args.target_l0) if len(full_runs) > 1
                   else lam * _slope_step(calibration["points"], lam, l0, args.target_l0))
        overrides["sparsity_coefficient"] = lam
    else:
        folder, seconds, rate = train_one(args, run, name, overrides, steps)
        full_runs.append({"l0": measure_l0(folder, x_ND), "seconds": seconds})
    metrics = evaluate(EvalConfig(run=str(run), sae=[name], examples=args.eval_examples, downstream=False))[name]
    lam_text = f", lambda {overrides['sparsity_coefficient']:.3g}" if lam0 is not None else ""
    return {"architecture": name, "settings": settings.format(k=k) + lam_text, "l0": metrics["l0"],
            "mcc": metrics["gt_mcc"], "f1": metrics["gt_f1"], "absorption": metrics["gt_absorption"],
            "fvu": metrics["fvu"], "dead_frac": metrics["dead_frac"], "rows": steps * args.batch_size,
            "steps": steps, "train_minutes": seconds / 60, "rows_per_s": rate,
            "calibration_minutes": (calibration["seconds"] + sum(r["seconds"] for r in full_runs[:-1])) / 60
            if calibration else 0.0,
            "calibration": calibration, "full_runs": full_runs, "overrides": overrides, **probe}


def _slope_step(points, lam: float, l0: float, target: float) -> float:
    """The lambda factor that moves L0 from l0 to target along the log-log slope of the two short runs
    nearest lam (a local slope: L1's L0 falls off a cliff past some lambda, a global one oversteps it)."""
    slope = 1.0
    near = sorted(sorted(points, key=lambda p: abs(math.log(p[0] / lam)))[:2])
    if len(near) == 2:
        (a, la), (b, lb) = near
        if abs(math.log(b / a)) > 1e-9 and abs(math.log(max(lb, 1e-3) / max(la, 1e-3))) > 1e-9:
            slope = min(max(-math.log(max(lb, 1e-3) / max(la, 1e-3)) / math.log(b / a), 0.3), 10.0)
    return min(max(math.exp(math.log(max(l0, 1e-3) / target) / slope), 1 / 16), 16.0)


def table(results: list[dict]) -> str:
    rows = ["| architecture | settings | L0 | MCC | F1 | absorption | FVU | samples | minutes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        absorption = "n/a" if r["absorption"] is None else f"{r['absorption']:.3f}"
        minutes = f"{r['train_minutes']:.1f}" + (f" (+{r['calibration_minutes']:.1f})" if r["calibration_minutes"] else "")
        rows.append(f"| {r['architecture']} | {r['settings']} | {r['l0']:.1f} | {r['mcc']:.3f} | {r['f1']:.3f} | "
                    f"{absorption} | {r['fvu']:.4f} | {r['rows']:,} | {minutes} |")
    return "\n".join(rows)


def plot(results: list[dict], path: Path, title: str, reference: bool) -> None:
    """Bars of MCC and F1 per architecture; the SynthSAEBench-16k reference points as markers."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["architecture"] for r in results]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=120)
    ax.bar([x - 0.2 for x in xs], [r["mcc"] for r in results], 0.4, label="MCC (ours)", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], [r["f1"] for r in results], 0.4, label="F1 (ours)", color="#dd8452")
    if reference:
        ref = [(x, REFERENCE[n]) for x, n in zip(xs, names) if n in REFERENCE]
        ax.scatter([x - 0.2 for x, _ in ref], [mcc for _, (_, mcc) in ref], marker="_", s=600, linewidths=2.5,
                   color="black", zorder=3, label="reference MCC (200M samples)")
        ax.scatter([x + 0.2 for x, _ in ref], [f1 for _, (f1, _) in ref], marker="_", s=600, linewidths=2.5,
                   color="#8b0000", zorder=3, label="reference F1 (200M samples)")
    for x, r in zip(xs, results):
        ax.text(x, max(r["mcc"], r["f1"]) + 0.01, f"L0 {r['l0']:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = prepare_run(args)
    model, _ = load_toy(run / "acts")
    x_ND = model.sample(8192, torch.Generator().manual_seed(CALIBRATE_SEED))[0].float()
    results_path = args.out / "results.json"
    done = {r["architecture"]: r for r in json.loads(results_path.read_text())["results"]} if results_path.exists() else {}
    header = {"preset": args.preset, "d_sae": args.d_sae, "target_l0": args.target_l0, "batch_size": args.batch_size,
              "lr": args.lr, "seed": args.seed, "rows": args.rows, "minutes": args.minutes,
              "eval_examples": args.eval_examples, "reference_samples": REFERENCE_SAMPLES}
    t0 = time.perf_counter()
    for name in args.architectures:
        if name in done:
            continue
        print(f"{name}:", flush=True)
        done[name] = run_architecture(args, run, name, x_ND)
        ordered = [done[n] for n in ARCHITECTURES if n in done]
        atomic_write_json(results_path, {**header, "results": ordered})
    results = [done[n] for n in ARCHITECTURES if n in done and n in args.architectures]
    text = table(results)
    samples = max(r["rows"] for r in results)
    summary = (f"{args.preset}: {args.d_sae} latents, target L0 {args.target_l0:g}, {samples:,} samples per "
               f"architecture ({REFERENCE_SAMPLES / samples:,.0f}x fewer than the reference's 200M); "
               f"wall time {(time.perf_counter() - t0) / 60:.1f} min this invocation")
    atomic_write_bytes(args.out / "table.md", (text + "\n\n" + summary + "\n").encode())
    plot(results, args.out / "gt-architectures.png",
         f"{args.preset}, {args.d_sae} latents, L0 ~{args.target_l0:g}, {samples:,} samples per SAE",
         reference=args.preset == "synthsaebench-16k")
    print(text)
    print(summary)
    print(f"wrote {results_path}, {args.out / 'table.md'}, {args.out / 'gt-architectures.png'}")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
