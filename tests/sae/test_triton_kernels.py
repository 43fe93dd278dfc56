"""The Triton kernels against the torch path (on a GPU when there is one, else in Triton's interpreter)."""

import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import gradcheck

from saex.sae.kernels import torch_ops, triton_ops

pytestmark = pytest.mark.skipif(not triton_ops.AVAILABLE, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(M=6, D=300, S=23, dtype=torch.float32, seed=0):
    """Bags of 0 to 40 entries (more than a block, and empty ones), D not a multiple of the block,
    repeated latents within a bag, zero values, and latents nobody selects."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([5, 0, 40, 1, 19, 33])[:M]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
    N = int(offsets[-1])
    W = torch.randn(S, D, generator=g, dtype=dtype)
    idx = torch.randint(0, S - 3, (N,), generator=g)
    idx[:3] = idx[3]
    val = torch.rand(N, generator=g, dtype=dtype)
    val[6:10] = 0
    rows = torch.arange(M).repeat_interleave(sizes)
    G = torch.randn(M, D, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (W, val, idx, offsets, rows, G)]


def test_gather_sum_matches_the_embedding_bag():
    W, val, idx, offsets, _, _ = _case()
    assert torch.allclose(triton_ops.gather_sum(W, val, idx, offsets), torch_ops.decode(W, val, idx, offsets),
                          atol=1e-5)


def test_gather_dot_matches_a_gathered_product():
    W, _, idx, _, rows, G = _case()
    assert torch.allclose(triton_ops.gather_dot(G, W, idx, rows), (W[idx] * G[rows]).sum(-1), atol=1e-4)


def test_entry_dots_match_the_torch_path():
    W, _, idx, offsets, _, G = _case()
    assert torch.allclose(triton_ops.entry_dots(G, W, idx, offsets), torch_ops.entry_dots(G, W, idx, offsets), atol=1e-4)


def test_scatter_rows_matches_the_torch_path_and_zeroes_unselected_latents():
    W, val, idx, _, rows, G = _case()
    out, sums = triton_ops.scatter_rows(G, val, idx, rows, W.shape[0])
    expected, expected_sums = torch_ops.scatter_rows(G, val, idx, rows, W.shape[0])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(sums, expected_sums, atol=1e-6)
    assert out[-3:].abs().sum() == 0


def test_bfloat16_values_accumulate_in_float32():
    W, val, idx, offsets, _, _ = _case()
    out = triton_ops.gather_sum(W, val.bfloat16(), idx, offsets)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch_ops.decode(W, val.bfloat16().float(), idx, offsets), atol=1e-5)


def test_decode_gradcheck_float64():
    W, val, idx, offsets, _, _ = _case(M=4, D=7, S=9, dtype=torch.float64)
    W.requires_grad_(), val.requires_grad_()
    assert gradcheck(lambda w, v: triton_ops.decode(w, v, idx, offsets), (W, val), eps=1e-6, atol=1e-6)


def test_decode_gradients_match_the_torch_path():
    W, val, idx, offsets, _, G = _case()
    grads = []
    for ops in (triton_ops, torch_ops):
        w, v = W.clone().requires_grad_(), val.clone().requires_grad_()
        grads.append(torch.autograd.grad((ops.decode(w, v, idx, offsets) * G).sum(), (w, v)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: compares the Triton and torch paths in a step")
@pytest.mark.parametrize("arch, extra", [("topk", {}), ("batchtopk", {}), ("jumprelu", {}), ("relu", {}),
                                         ("gated", {}), ("prolu", {}), ("batchtopk", {"matryoshka": "fixed"})])
def test_training_step_on_triton_equals_the_torch_path(monkeypatch, arch, extra):
    from saex.sae import SAE, SAEConfig
    from saex.sae.arch import TrainContext

    torch.manual_seed(0)
    cfg = SAEConfig(d_in=256, d_sae=4096, k=16, architecture=arch, select_precision="float32", **extra)
    x = torch.randn(512, 256, device="cuda")
    grads = []
    for kernels in ("auto", "torch"):
        monkeypatch.setenv("SAEX_KERNELS", kernels)
        torch.manual_seed(1)
        sae = SAE(cfg).cuda()
        sae.arch.init_from_data(sae, x)
        _as_after_a_sparse_step(sae)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae.train_forward(x, TrainContext(sparsity_coefficient=0.1))
        out.loss.backward()
        grads.append({n: p.grad.float() for n, p in sae.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-3, atol=1e-5), name


def _as_after_a_sparse_step(sae) -> None:
    """The density-routed architectures route by the last step's L0 (unknown at first: dense): take the
    sparse kernels."""
    if hasattr(sae.arch, "recent_l0"):
        sae.arch.recent_l0.zero_()


def compile_for_hopper(values: str) -> None:
    """Compile each kernel for sm_90 as the launchers call it (no GPU needed; not under the interpreter)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from saex.sae.kernels import triton_kernels as kernels

    segment = {"Src": "*fp32", "V": f"*{values}", "I": "*i64", "Offsets": "*i64", "Out": "*fp32", "Sums": "*fp32",
               "D": "i32", "stride_src": "i32"}
    signatures = [  # the gather and the scatter both run the segment sum, with their own launch parameters
        (kernels.segment_sum_kernel, segment, "gather"),
        (kernels.segment_sum_kernel, segment, "scatter"),
        (kernels.gather_dot_kernel, {"G": "*fp32", "W": "*fp32", "I": "*i64", "R": "*i64", "Out": f"*{values}",
                                     "N": "i32", "D": "i32", "stride_w": "i32"}, "dot"),
    ]
    for kernel, signature, tuning in signatures:
        launch = triton_ops.TUNING[tuning]
        constants = {"ACC": tl.float32, "BLOCK_E": launch["BLOCK_E"], "BLOCK_D": launch["BLOCK_D"],
                     **({"SUMS": tuning == "scatter"} if kernel is kernels.segment_sum_kernel else {})}
        signature = {**signature, **{name: "constexpr" for name in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": launch["num_warps"]})
        assert "ld.global" in compiled.asm["ptx"], kernel
    launch = triton_ops.TUNING["group_max"]
    constants = {"G": 16, "BLOCK": launch["BLOCK"]}
    source = ASTSource(kernels.group_max_kernel, {"Z": "*bf16", "Out": "*bf16", "N": "i32", "G": "constexpr",
                                                  "BLOCK": "constexpr"}, constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": launch["num_warps"]})
    assert "ld.global" in compiled.asm["ptx"]



@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above compile the kernels for real")
@pytest.mark.parametrize("values", ["fp32", "bf16"])
def test_kernels_compile_for_an_h100(values):
    """The interpreter tolerates what the compiler may reject; Triton compiles for sm_90 without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", f"from tests.sae.test_triton_kernels import compile_for_hopper; "
                           f"compile_for_hopper({values!r})"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA test above covers this on a GPU")
@pytest.mark.parametrize("arch, extra", [("topk", {}), ("batchtopk", {}), ("jumprelu", {"jumprelu_bandwidth": 0.5}),
                                         ("jumprelu", {"jumprelu_bandwidth": 0.5, "select_precision": "bfloat16"}),
                                         ("relu", {}), ("relu", {"l1_variant": "classic"}), ("gated", {}),
                                         ("prolu", {"prolu_grad": "ste"}), ("topk", {"matryoshka": "fixed"})])
def test_training_step_through_the_triton_path_equals_the_torch_path(monkeypatch, arch, extra):
    """The whole step (sparse encoder, decoder, Matryoshka bags, JumpReLU windows, unpadded rows of ReLU,
    Gated (with its frozen-decoder reconstruction) and ProLU, AuxK on ten dead latents) routed through the Triton launchers, run by the interpreter on CPU tensors, against
    the torch path."""
    from saex.sae import SAE, SAEConfig
    from saex.sae.arch import TrainContext

    cfg = SAEConfig(d_in=16, d_sae=64, k=4, architecture=arch, **{"select_precision": "float32", **extra})
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for through_triton in (True, False):
        monkeypatch.setattr(triton_ops, "usable", lambda t, on=through_triton: on)
        torch.manual_seed(1)
        sae = SAE(cfg)
        sae.arch.init_from_data(sae, x)
        _as_after_a_sparse_step(sae)
        out = sae.train_forward(x, TrainContext(sparsity_coefficient=0.1, dead_S=torch.arange(64) < 10))
        out.loss.backward()
        grads.append({n: p.grad for n, p in sae.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5), name


def test_group_max_matches_torch_amax():
    z = torch.randn(5, 48 * 16, generator=torch.Generator().manual_seed(3)).bfloat16().to(DEVICE)
    z[1, 16:32] = float("-inf")
    z[2, 40] = float("nan")  # a NaN is the largest, as torch.amax has it
    for G in (16, 8):
        expected = z.view(5, -1, G).amax(-1)
        torch.testing.assert_close(triton_ops.group_max(z, G), expected, rtol=0, atol=0, equal_nan=True)
        assert expected.isnan().sum() == 1


def test_grouped_topk_through_the_triton_group_maxima(monkeypatch):
    from saex.sae.kernels import dispatch

    monkeypatch.setattr(triton_ops, "usable", lambda t: True)  # the CUDA route, on CPU tensors when no GPU:
    monkeypatch.setattr(dispatch, "ranking_keys", lambda z: z.detach())  # float keys, as on CUDA
    z = torch.randn(4, 1024, generator=torch.Generator().manual_seed(4)).bfloat16().to(DEVICE)
    indices = dispatch.grouped_topk(z, 20, 16)
    assert torch.equal(z.gather(1, indices).float().sort(-1).values, z.topk(20, dim=-1).values.float().sort(-1).values)
