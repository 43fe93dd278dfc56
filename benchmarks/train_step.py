"""One training step (forward, backward, Adam) of saex against sparsify and SAELens, at the same
shape, in the same process. Prints a JSON table: ms/step, tokens/s, peak GPU memory, ratios.

    .venv/bin/python benchmarks/train_step.py               # 2-CPU shape: d 384, 6,144 latents, batch 1,024, k 32
    .venv/bin/python benchmarks/train_step.py --shape h100  # d 1,024, 65,536 latents, batch 4,096, k 32

Needs the bench extra (pip install 'saex[bench]': sparsify and SAELens); a library that is missing
is left out of the table. Every row steps with Adam."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

SHAPES = {"cpu": (384, 6144, 1024, 32), "h100": (1024, 65536, 4096, 32)}


def _time(step, steps: int, device: torch.device) -> tuple[float, float | None]:
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return 1000 * statistics.median(times), peak


def saex_rows(d, S, B, k, x, device):
    from saex.sae import SAE, SAEConfig
    from saex.sae.arch import TrainContext
    from saex.train.optim import make_adam

    variants = {
        "topk": dict(architecture="topk"),
        "topk (bf16 selection)": dict(architecture="topk", select_precision="bfloat16"),
        "topk (dense reference)": dict(architecture="topk", encoder_kernel="dense"),
        "batchtopk": dict(architecture="batchtopk"),
        "jumprelu": dict(architecture="jumprelu", jumprelu_init_l0=0),
        "relu": dict(architecture="relu"),
        "matryoshka batchtopk": dict(architecture="batchtopk", matryoshka="fixed"),
    }
    for name, kw in variants.items():
        sae = SAE(SAEConfig(d_in=d, d_sae=S, k=k, **kw)).to(device)
        opt = make_adam(sae.parameters(), 1e-4)
        ctx = TrainContext(sparsity_coefficient=1.0)

        def step():
            out = sae.train_forward(x, ctx)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        yield "saex", name, step


def sparsify_rows(d, S, B, k, x, device):
    with contextlib.redirect_stdout(sys.stderr):  # it prints a notice at import; keep stdout JSON
        from sparsify import SparseCoder, SparseCoderConfig

    sc = SparseCoder(d, SparseCoderConfig(num_latents=S, k=k), device=device, dtype=torch.float32)
    for opt_name, opt in (("adam", torch.optim.Adam(sc.parameters(), lr=1e-4)),):
        def step(opt=opt):
            loss = sc(x).fvu
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        yield "sparsify", f"topk ({opt_name})", step


def saelens_rows(d, S, B, k, x, device):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    dev = str(device)
    models = {
        "topk": lambda: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=S, k=k, device=dev)),
        "batchtopk": lambda: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d, d_sae=S, k=k, device=dev)),
        "jumprelu": lambda: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=S, device=dev)),
        "relu": lambda: StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=S, device=dev)),
        "matryoshka batchtopk": lambda: MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d, d_sae=S, k=k, device=dev, matryoshka_widths=[S // 16, S // 8, S // 4, S // 2, S])),
    }
    for name, make in models.items():
        sae = make()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        coefficients = {n: float(getattr(c, "value", c)) for n, c in sae.get_coefficients().items()}
        inp = TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=0,
                             is_logging_step=False)

        def step(sae=sae, opt=opt, inp=inp):
            out = sae.training_forward_pass(inp)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        yield "saelens", name, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="libraries to run (saex sparsify saelens)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, S, B, k = SHAPES[args.shape]
    torch.manual_seed(0)
    x = torch.randn(B, d, device=device)
    table, skipped = [], {}
    for lib, rows in (("saex", saex_rows), ("sparsify", sparsify_rows), ("saelens", saelens_rows)):
        if args.only and lib not in args.only:
            continue
        try:
            for library, name, step in rows(d, S, B, k, x, device):
                ms, peak = _time(step, args.steps, device)
                table.append({"library": library, "architecture": name, "ms_per_step": round(ms, 2),
                              "tokens_per_s": round(B / ms * 1000), "peak_mib": peak and round(peak)})
        except ImportError as e:
            skipped[lib] = str(e)
    by = {(r["library"], r["architecture"].split(" (")[0]): r["tokens_per_s"] for r in table
          if "(" not in r["architecture"] or r["library"] == "sparsify"}
    ratios = {}
    for r in table:
        if r["library"] != "saex":
            continue
        arch = r["architecture"].split(" (")[0]
        if ("saelens", arch) in by:
            ratios[f"{r['architecture']} / saelens"] = round(r["tokens_per_s"] / by[("saelens", arch)], 2)
        if arch == "topk" and ("sparsify", "topk") in by:
            ratios[f"{r['architecture']} / sparsify"] = round(r["tokens_per_s"] / by[("sparsify", "topk")], 2)
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "threads": torch.get_num_threads(), "shape": {"d_in": d, "d_sae": S, "batch": B, "k": k},
                      "rows": table, "ratios": ratios, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
