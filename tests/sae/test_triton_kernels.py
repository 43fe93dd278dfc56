"""The Triton kernels against the torch path (on a GPU when there is one, else in Triton's interpreter)."""

import pytest
import torch
from torch.autograd import gradcheck

from saex.sae.kernels import torch_ops, triton_ops

pytestmark = pytest.mark.skipif(not triton_ops.AVAILABLE, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(B=5, K=19, D=150, S=23, dtype=torch.float32, seed=0):
    """K and D not multiples of the blocks; repeated latents within rows; some latents never selected."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(S, D, generator=g, dtype=dtype)
    idx = torch.randint(0, S - 3, (B, K), generator=g)
    idx[0, :3] = idx[0, 3]
    val = torch.rand(B, K, generator=g, dtype=dtype)
    val[1, :4] = 0  # zero-valued entries (padding) must not disturb the sums
    X = torch.randn(B, D, generator=g, dtype=dtype)
    return [t.to(DEVICE) for t in (W, val, idx, X)]


def test_gather_sum_matches_the_embedding_bag():
    W, val, idx, _ = _case()
    assert torch.allclose(triton_ops.gather_sum(W, val, idx), torch_ops.decode(W, val, idx), atol=1e-5)


def test_gather_dot_matches_a_gathered_product():
    W, _, idx, X = _case()
    assert torch.allclose(triton_ops.gather_dot(X, W, idx), (W[idx] * X[:, None, :]).sum(-1), atol=1e-4)


def test_scatter_rows_matches_the_torch_path_and_zeroes_unselected_latents():
    W, val, idx, X = _case()
    out = triton_ops.scatter_rows(X, val, idx, W.shape[0])
    assert torch.allclose(out, torch_ops.scatter_rows(X, val, idx, W.shape[0]), atol=1e-5)
    assert out[-3:].abs().sum() == 0


def test_bfloat16_values_accumulate_in_float32():
    W, val, idx, _ = _case()
    out = triton_ops.gather_sum(W, val.bfloat16(), idx)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch_ops.decode(W, val.bfloat16().float(), idx), atol=1e-5)


def test_decode_gradcheck_float64():
    W, val, idx, _ = _case(B=3, K=5, D=7, S=9, dtype=torch.float64)
    W.requires_grad_(), val.requires_grad_()
    assert gradcheck(lambda w, v: triton_ops.decode(w, v, idx), (W, val), eps=1e-6, atol=1e-6)


def test_decode_gradients_match_the_torch_path():
    W, val, idx, G = _case()
    grads = []
    for ops in (triton_ops, torch_ops):
        w, v = W.clone().requires_grad_(), val.clone().requires_grad_()
        grads.append(torch.autograd.grad((ops.decode(w, v, idx) * G).sum(), (w, v)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: compares the Triton and torch paths in a step")
@pytest.mark.parametrize("arch, extra", [("topk", {}), ("batchtopk", {}), ("jumprelu", {}),
                                         ("batchtopk", {"matryoshka": "fixed"})])
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
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = sae.train_forward(x, TrainContext(sparsity_coefficient=0.1))
        out.loss.backward()
        grads.append({n: p.grad.float() for n, p in sae.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-3, atol=1e-5), name
