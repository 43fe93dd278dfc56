"""The sparse TopK encoder against plain autograd: gradcheck, and equal outputs and gradients."""

import pytest
import torch
from torch.autograd import gradcheck

from saex.sae import SAE, SAEConfig
from saex.sae.arch import TrainContext
from saex.sae.kernels import topk_encode


def _inputs(dtype=torch.float64, B=6, d=5, S=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, dtype=dtype, generator=g)
    W = torch.randn(d, S, dtype=dtype, generator=g)
    b_enc = torch.randn(S, dtype=dtype, generator=g) * 0.1
    b_dec = torch.randn(d, dtype=dtype, generator=g) * 0.1
    return [t.requires_grad_() for t in (x, W, b_enc, b_dec)]


def test_gradcheck_float64():
    x, W, b_enc, b_dec = _inputs()
    assert gradcheck(lambda *a: topk_encode(*a, 4)[0], (x, W, b_enc, b_dec), eps=1e-6, atol=1e-6)


def test_matches_dense_autograd():
    x, W, b_enc, b_dec = _inputs()
    v, i = topk_encode(x, W, b_enc, b_dec, 4)
    z = (x - b_dec) @ W + b_enc
    ref_v, ref_i = z.topk(4, dim=-1, sorted=False)
    ref_v = torch.relu(ref_v)
    assert torch.equal(i, ref_i) and torch.allclose(v, ref_v)
    g = torch.randn_like(v)
    grads = torch.autograd.grad((v * g).sum(), (x, W, b_enc, b_dec))
    ref = torch.autograd.grad((ref_v * g).sum(), (x, W, b_enc, b_dec))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_sae_sparse_and_dense_paths_agree():
    torch.manual_seed(0)
    dense = SAE(SAEConfig(d_in=16, d_sae=64, k=5, encoder_kernel="dense"))
    sparse = SAE(SAEConfig(d_in=16, d_sae=64, k=5, encoder_kernel="sparse"))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(32, 16)
    outs = [s.train_forward(x, TrainContext()) for s in (dense, sparse)]
    assert torch.allclose(outs[0].x_hat_BD, outs[1].x_hat_BD, atol=1e-5)
    for o in outs:
        o.loss.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(dense, name).grad, getattr(sparse, name).grad, atol=1e-5), name


def test_bfloat16_selection_picks_nearly_the_same_latents():
    x, W, b_enc, b_dec = (t.detach().float() for t in _inputs(B=64, d=32, S=256))
    exact = topk_encode(x, W, b_enc, b_dec, 8)[1]
    fast = topk_encode(x, W, b_enc, b_dec, 8, torch.bfloat16)[1]
    overlap = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), fast.tolist())) / exact.numel()
    assert overlap > 0.95


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_auxk_falls_back_to_dense_pre_activations(kernel):
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=3, encoder_kernel=kernel))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    out = sae.train_forward(torch.randn(10, 8), TrainContext(dead_S=dead))
    assert "auxk" in out.losses
