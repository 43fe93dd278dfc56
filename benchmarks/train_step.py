"""One training step (forward, backward, Adam) of saex against sparsify and SAELens, at the same
shape, in the same process. Prints a JSON table: ms/step, tokens/s, peak GPU memory, ratios. Rows are
timed in rounds (every row takes a few steps per round), so that the machine's drift hits all rows alike.

    .venv/bin/python benchmarks/train_step.py               # 2-CPU shape: d 384, 6,144 latents, batch 1,024, k 32
    .venv/bin/python benchmarks/train_step.py --shape h100  # d 1,024, 65,536 latents, batch 4,096, k 32

Needs the bench extra (pip install 'saex[bench]': sparsify and SAELens); a library that is missing
is left out of the table. Every row steps with Adam. saex's rows run under bf16 autocast where the
hardware multiplies bf16 natively (GPUs, CPUs with AVX512-BF16 or AMX), as its trainer does; sparsify
autocasts its own forward on a GPU; SAELens runs in its default float32 and, where bf16 is native, in
a second row per architecture under bf16 autocast; ratios are taken against SAELens' faster row. Adam
steps at learning rate 0 (its arithmetic unchanged), so that each SAE keeps the state its row names. Add
--profile to see where a row's step spends its time, --allocator tuned to time every library with the
glibc thresholds that saex's trainer sets on CPUs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from unittest import mock

import torch
from machine import describe  # benchmarks/machine.py, beside this script

SHAPES = {"cpu": (384, 6144, 1024, 32), "h100": (1024, 65536, 4096, 32)}
# Every optimiser runs its full update at learning rate 0, so that each SAE stays in the state its row
# names: stepping on one batch at 1e-4, JumpReLU's thresholds set for L0 64 let L0 drift to 338 within 40
# steps (ReLU's from 66 to 360), and the row would time whichever paths that drift passes through
LR = 0.0


def _measure(rows, rounds: int, steps: int, device: torch.device, batch: int, profile: str | None = None) -> list[dict]:
    """Peak memory per row (each built and stepped alone, above what earlier rows hold), then ms/step: in
    each round every row takes one untimed step (its weights back in cache) and `steps` timed ones, so that
    drift in the machine's speed hits all rows alike; the median over all timed steps is reported."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    built = []
    for library, name, make in rows:
        sync()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            step = make()
            for _ in range(3):
                step()
            sync()
        except Exception as e:  # one library's failure (a version mismatch, say) must not lose the table
            print(f"{library} {name} failed: {e!r}", file=sys.stderr)
            continue
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
        built.append((library, name, step, peak, [], []))
    for _ in range(rounds):
        for *_, step, _peak, times, faults in built:
            step()
            for _ in range(steps):
                sync()
                f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    if profile is not None:
        _profile(built, device, profile)
    # page faults per step: memory the allocator handed back to the kernel and took again (see --allocator)
    return [{"library": library, "architecture": name, "ms_per_step": round(1000 * statistics.median(times), 2),
             "tokens_per_s": round(batch / statistics.median(times)), "peak_mib": peak and round(peak),
             "page_faults_per_step": round(statistics.median(faults))}
            for library, name, _, peak, times, faults in built]


def _profile(built, device: torch.device, pattern: str) -> None:
    """Where each matching row's step spends its time: the profiler's top kernels, on stderr."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for library, name, step, *_ in built:
        if not any(p in f"{library} {name}" for p in pattern.split(",")):
            continue
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n=== {library} {name} (5 steps) ===", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60), file=sys.stderr)


def _graphed_step(forward, opt):
    """The whole step (forward, backward, Adam) captured once in a CUDA graph and replayed: what the GPU
    does when the CPU's launches are out of the way."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (Adam's state, the kernels' compilation)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            forward().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        forward().backward()
        opt.step()
    return graph.replay


def _adam_step(forward, params, opt=None):
    """A step function: forward() returns the loss; Adam (or `opt`) steps on `params`."""
    opt = opt or torch.optim.Adam(params, lr=LR)

    def step():
        loss = forward()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def saex_rows(d, S, B, k, x, device):
    from saex.sae import SAE, SAEConfig
    from saex.sae.arch import TrainContext
    from saex.sae.kernels.precision import native_bfloat16
    from saex.train.optim import make_adam

    variants = {
        "topk": dict(architecture="topk"),
        "topk (float32 selection)": dict(architecture="topk", select_precision="float32"),
        "topk (dense reference)": dict(architecture="topk", encoder_kernel="dense"),
        "batchtopk": dict(architecture="batchtopk"),
        "jumprelu": dict(architecture="jumprelu"),  # thresholds start at L0 64, as in training
        "jumprelu (float32 selection)": dict(architecture="jumprelu", select_precision="float32"),
        "relu": dict(architecture="relu"),  # a fresh SAE: about half the latents fire, the dense path serves
        "relu (L0 64)": dict(architecture="relu"),  # as once the L1 has made codes sparse: the sparse kernels
        "matryoshka batchtopk": dict(architecture="batchtopk", matryoshka="fixed"),
        "gated": dict(architecture="gated"),  # fresh: about half the gates open, the dense path serves
        "gated (L0 64)": dict(architecture="gated"),
        "prolu (L0 64)": dict(architecture="prolu"),  # no SAELens counterpart
    }
    environments = {name: {} for name in variants}
    graphed = set()
    if device.type == "cuda":  # the grouped top-k against torch.topk; the step's CPU side out of the way
        variants["topk (torch.topk selection)"] = dict(architecture="topk")
        environments["topk (torch.topk selection)"] = {"SAEX_TOPK": "torch"}
        variants["topk (CUDA graph)"] = dict(architecture="topk")
        environments["topk (CUDA graph)"] = {}
        graphed.add("topk (CUDA graph)")
    ctx = TrainContext(sparsity_coefficient=1.0)
    for name, kw in variants.items():
        def make(name=name, kw=kw, env=environments[name]):
            sae = SAE(SAEConfig(d_in=d, d_sae=S, k=k, **kw)).to(device)
            sae.arch.init_from_data(sae, x)  # as training does (JumpReLU thresholds; a no-op elsewhere)
            if "L0 64" in name:  # each latent fires (Gated: its gate opens) on 64 / S of the batch
                with torch.no_grad():
                    sae.b_enc -= torch.quantile(sae.pre_acts(x), 1 - 64 / S, dim=0)
            patch = mock.patch.dict(os.environ, env) if env else contextlib.nullcontext()

            def forward():  # under bf16 autocast where it is native, as saex's trainer steps
                with patch, torch.autocast(device.type, torch.bfloat16, enabled=native_bfloat16(device)):
                    return sae.train_forward(x, ctx).loss
            if name in graphed:
                return _graphed_step(forward, torch.optim.Adam(sae.parameters(), lr=LR, fused=True,
                                                               capturable=True))
            return _adam_step(forward, None, make_adam(sae.parameters(), LR))
        yield "saex", name, make


def sparsify_rows(d, S, B, k, x, device):
    if device.type != "cuda":  # sparsify picks its Triton decoder whenever Triton imports, even for CPU tensors
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    with contextlib.redirect_stdout(sys.stderr):  # it prints a notice at import; keep stdout JSON
        from sparsify import SparseCoder, SparseCoderConfig

    def make():
        sc = SparseCoder(d, SparseCoderConfig(num_latents=S, k=k), device=device, dtype=torch.float32)
        return _adam_step(lambda: sc(x).fvu, sc.parameters())
    yield "sparsify", "topk (adam)", make


def saelens_rows(d, S, B, k, x, device):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
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
        "gated": lambda: GatedTrainingSAE(GatedTrainingSAEConfig(d_in=d, d_sae=S, device=dev)),
        "matryoshka batchtopk": lambda: MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d, d_sae=S, k=k, device=dev, matryoshka_widths=[S // 16, S // 8, S // 4, S // 2, S])),
    }
    # float32 is SAELens' default; its runner can also autocast to bf16 on a GPU, and we give it the same
    # autocast as saex's rows wherever bf16 is native (CPUs with AVX512-BF16 too)
    from saex.sae.kernels.precision import native_bfloat16
    precisions = [False, True] if native_bfloat16(device) else [False]
    for (name, build), autocast in ((m, a) for a in precisions for m in models.items()):
        def make(build=build, autocast=autocast):
            sae = build()
            coefficients = {n: float(getattr(c, "value", c)) for n, c in sae.get_coefficients().items()}
            inp = TrainStepInput(sae_in=x, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=0,
                                 is_logging_step=False)

            def forward():
                with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                    return sae.training_forward_pass(inp).loss
            return _adam_step(forward, sae.parameters())
        yield "saelens", f"{name} (bf16 autocast)" if autocast else name, make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all rows")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row and round")
    parser.add_argument("--only", nargs="*", default=None, help="libraries to run (saex sparsify saelens)")
    parser.add_argument("--profile", default=None, metavar="TEXT",
                        help="after timing, profile the rows whose 'library architecture' contains TEXT "
                             "(several: comma-separated); the top kernels go to stderr")
    parser.add_argument("--allocator", choices=("default", "tuned"), default="default",
                        help="the process's glibc allocator: as it starts (default), or with the raised "
                             "thresholds saex's trainer sets on CPUs (saex.train.host), for every library alike")
    args = parser.parse_args()
    if args.allocator == "tuned":
        from saex.train.host import tune_allocator
        tune_allocator()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d, S, B, k = SHAPES[args.shape]
    torch.manual_seed(0)
    x = torch.randn(B, d, device=device)
    pending, skipped = [], {}
    for lib, rows in (("saex", saex_rows), ("sparsify", sparsify_rows), ("saelens", saelens_rows)):
        if args.only and lib not in args.only:
            continue
        try:
            pending.extend(rows(d, S, B, k, x, device))
        except ImportError as e:
            skipped[lib] = str(e)
    table = _measure(pending, args.rounds, args.steps, device, B, args.profile)
    by = {}  # each library's fastest row per architecture (SAELens: float32 or autocast)
    for r in table:
        if r["library"] != "saex":
            key = (r["library"], r["architecture"].split(" (")[0])
            by[key] = max(by.get(key, 0), r["tokens_per_s"])
    ratios = {}
    for r in table:
        if r["library"] != "saex":
            continue
        arch = r["architecture"].split(" (")[0]
        if ("saelens", arch) in by:
            ratios[f"{r['architecture']} / saelens"] = round(r["tokens_per_s"] / by[("saelens", arch)], 2)
        if arch == "topk" and ("sparsify", "topk") in by:
            ratios[f"{r['architecture']} / sparsify"] = round(r["tokens_per_s"] / by[("sparsify", "topk")], 2)
    peaks = {(r["library"], r["architecture"]): r["peak_mib"] for r in table if r["peak_mib"]}
    if ("saex", "topk") in peaks and ("sparsify", "topk (adam)") in peaks:
        ratios["topk peak memory / sparsify"] = round(peaks[("saex", "topk")] / peaks[("sparsify", "topk (adam)")], 2)
    print(json.dumps({"device": describe(device),
                      "allocator": args.allocator, "shape": {"d_in": d, "d_sae": S, "batch": B, "k": k},
                      "rows": table, "ratios": ratios, "skipped": skipped}, indent=2))


if __name__ == "__main__":
    main()
