"""Times saex's Triton kernels under alternative launch parameters (triton_ops.TUNING) on a GPU, at a
training step's shapes, and torch's own ops beside them. Prints JSON: microseconds per call, best first.

    python benchmarks/kernels.py                 # d 1,024, 65,536 latents, batch 4,096, k 32
    python benchmarks/kernels.py --only topk scatter

Needs CUDA and Triton."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys

import torch


def _time(fn) -> float:
    import triton.testing

    return round(1000 * triton.testing.do_bench(fn, warmup=10, rep=50), 1)


@contextlib.contextmanager
def _tuned(name: str, launch: dict):
    """Kernel `name` launched with `launch` (the top-k's group size is the dispatcher's TOPK_GROUP)."""
    from saex.sae.kernels import dispatch, triton_ops

    if name == "topk":
        default, dispatch.TOPK_GROUP["cuda"] = dispatch.TOPK_GROUP["cuda"], launch["G"]
    else:
        default, triton_ops.TUNING[name] = triton_ops.TUNING[name], launch
    try:
        yield
    finally:
        if name == "topk":
            dispatch.TOPK_GROUP["cuda"] = default
        else:
            triton_ops.TUNING[name] = default


def _grid(**axes):
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("-k", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=["topk", "group_max", "gather", "scatter", "dot"])
    args = parser.parse_args()
    from saex.sae.code import bag_rows
    from saex.sae.kernels import dispatch, triton_ops

    D, S, B, k = args.d_in, args.d_sae, args.batch, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g)
    W = torch.randn(S, D, device="cuda", generator=g) / D**0.5
    z = torch.nn.functional.linear(x.bfloat16(), W.bfloat16())  # pre-activations as training ranks them
    values, indices = z.topk(k, dim=-1, sorted=False)
    values_N, indices_N = values.reshape(-1), indices.reshape(-1)
    offsets = torch.arange(0, B * k + 1, k, device="cuda")
    rows_N = bag_rows(offsets, B * k)
    cases = {
        "topk": (lambda: dispatch.grouped_topk(z, k, dispatch.TOPK_GROUP["cuda"]), _grid(G=[8, 16, 32, 64]),
                 {"torch.topk": lambda: z.topk(k, dim=-1, sorted=False),
                  "torch amax of the groups": lambda: z.view(B, -1, dispatch.TOPK_GROUP["cuda"]).amax(-1)}),
        "group_max": (lambda: triton_ops.group_max(z, dispatch.TOPK_GROUP["cuda"]),
                      _grid(BLOCK=[64, 256, 1024], num_warps=[4, 8]), {}),
        "gather": (lambda: triton_ops.gather_sum(W, values_N, indices_N, offsets),
                   _grid(BLOCK_E=[8, 32], BLOCK_D=[256, 512, 1024], num_warps=[4, 8]),
                   {"embedding_bag": lambda: torch.nn.functional.embedding_bag(
                       indices_N, W, offsets, mode="sum", per_sample_weights=values_N.float(),
                       include_last_offset=True)}),
        "scatter": (lambda: triton_ops.scatter_rows(x, values_N, indices_N, rows_N, S),
                    _grid(BLOCK_E=[2, 4, 8], BLOCK_D=[256, 512, 1024], num_warps=[2, 4, 8]),
                    {"index_add": lambda: torch.zeros(S, D, device="cuda").index_add_(
                        0, indices_N, x[rows_N] * values_N.float()[:, None])}),
        "dot": (lambda: triton_ops.gather_dot(x, W, indices_N, rows_N),
                _grid(BLOCK_E=[16, 32, 64], BLOCK_D=[128, 256, 512], num_warps=[4, 8]),
                {"gathered product": lambda: (W[indices_N] * x[rows_N]).sum(-1)}),
    }
    tuning = {**triton_ops.TUNING, "topk": {"G": dispatch.TOPK_GROUP["cuda"]}}
    report = {"device": torch.cuda.get_device_name(), "shape": {"d_in": D, "d_sae": S, "batch": B, "k": k},
              "default": {name: dict(tuning[name]) for name in cases}}
    for name in args.only:
        run, grid, baselines = cases[name]
        timings = []
        for launch in grid:
            try:
                with _tuned(name, launch):
                    timings.append({**launch, "us": _time(run)})
            except Exception as e:  # a launch that does not fit (registers, shared memory) is reported
                timings.append({**launch, "error": repr(e)[:200]})
        report[name] = {"default_us": _time(run), **{b: _time(fn) for b, fn in baselines.items()},
                        "grid": sorted(timings, key=lambda t: t.get("us", float("inf")))}
        print(json.dumps({name: report[name]["grid"][:3]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
