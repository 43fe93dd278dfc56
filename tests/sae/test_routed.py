"""ReLU, JumpReLU, Gated and ProLU: their sparse paths against dense autograd, JumpReLU's exact selection from
bfloat16 candidates, and the routing between the paths by the last step's L0."""

import pytest
import torch

from saex.sae import SAE, SAEConfig
from saex.sae.arch import TrainContext
from saex.sae.kernels import torch_ops

@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_jumprelu_sparse_path_matches_the_dense_straight_through_gradients(precision):
    """Against float32 dense autograd, with the float32 selection and with bfloat16 candidates that
    float32 dot products decide."""
    torch.manual_seed(0)
    kw = dict(d_in=16, d_sae=64, architecture="jumprelu", jumprelu_bandwidth=0.5)
    dense = SAE(SAEConfig(encoder_kernel="dense", select_precision="float32", **kw))
    sparse = SAE(SAEConfig(encoder_kernel="sparse", select_precision=precision, **kw))
    with torch.no_grad():
        dense.arch.threshold.uniform_(0.1, 0.6)
    sparse.load_state_dict(dense.state_dict())
    sparse.arch.recent_l0.zero_()  # as after a sparse step
    x = torch.randn(32, 16)
    outs = [s.train_forward(x, TrainContext(sparsity_coefficient=0.3)) for s in (dense, sparse)]
    assert torch.allclose(outs[0].x_hat_BD, outs[1].x_hat_BD, atol=1e-5)
    assert torch.allclose(outs[0].loss, outs[1].loss, atol=1e-5) and torch.allclose(outs[0].l0, outs[1].l0)
    assert torch.equal(outs[0].fired_S, outs[1].fired_S)
    for o in outs:
        o.loss.backward()
    assert dense.arch.threshold.grad.abs().sum() > 0  # the window caught some pre-activations
    for name in ("W_enc_SD", "b_enc", "W_dec", "b_dec", "arch.threshold"):
        a, b = (s.get_parameter(name).grad for s in (dense, sparse))
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("arch, extra", [("relu", {"l1_variant": "april"}), ("relu", {"l1_variant": "classic"}),
                                         ("gated", {}), ("prolu", {"prolu_grad": "relu"}),
                                         ("prolu", {"prolu_grad": "ste"})])
def test_sparse_path_matches_dense_autograd(arch, extra):
    """Once codes are sparse a step takes the sparse kernels: the same code, losses (MSE; the L1, weighted
    by decoder norms or not; Gated's auxiliary reconstruction) and gradients of every parameter as plain
    autograd, with gates that open where the magnitude is negative (Gated) and biases of both signs."""
    torch.manual_seed(0)
    kw = dict(d_in=16, d_sae=64, architecture=arch, select_precision="float32", **extra)
    dense, sparse = SAE(SAEConfig(encoder_kernel="dense", **kw)), SAE(SAEConfig(encoder_kernel="sparse", **kw))
    with torch.no_grad():
        dense.b_enc.uniform_(-0.3, 0.1)
        dense.W_dec.mul_(torch.rand(64, 1) + 0.5)  # unequal decoder norms, for the weighted L1s
        if arch == "gated":
            dense.arch.r_mag.uniform_(-0.5, 0.5)
            dense.arch.b_mag.uniform_(-0.3, 0.1)
    sparse.load_state_dict(dense.state_dict())
    sparse.arch.recent_l0.zero_()  # as after a sparse step
    x = torch.randn(32, 16)
    outs = [s.train_forward(x, TrainContext(sparsity_coefficient=0.3)) for s in (dense, sparse)]
    assert 0 < float(outs[1].l0) < 32 and torch.allclose(outs[0].l0, outs[1].l0)
    assert torch.equal(outs[0].fired_S, outs[1].fired_S)
    assert torch.allclose(outs[0].x_hat_BD, outs[1].x_hat_BD, atol=1e-5)
    assert outs[0].losses.keys() == outs[1].losses.keys()
    for name in outs[0].losses:
        assert torch.allclose(outs[0].losses[name], outs[1].losses[name], atol=1e-6), name
    if arch == "gated":  # the routing counts open gates, more than the latents that fire here
        assert torch.allclose(outs[0].extras["open_gates"], outs[1].extras["open_gates"])
        assert float(outs[1].extras["open_gates"]) > float(outs[1].l0)
    for o in outs:
        o.loss.backward()
    for name, p in dense.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, sparse.get_parameter(name).grad, atol=1e-5), name


@pytest.mark.parametrize("arch", ["relu", "gated", "prolu"])
def test_a_sparse_step_with_no_entry_at_all_matches_the_dense_one(arch):
    """A run whose codes collapse to L0 0 routes its next step to the sparse path, where no entry is
    kept: the same losses and gradients as the dense step, nothing raised."""
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture=arch, select_precision="float32"))
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    outs, grads = [], []
    for _ in range(2):  # dense (L0 unknown), then sparse (after L0 0)
        sae.zero_grad()
        outs.append(sae.train_forward(x, TrainContext(sparsity_coefficient=0.1)))
        outs[-1].loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    assert float(sae.arch.recent_l0) == 0.0 and float(outs[1].l0) == 0.0 and not outs[1].fired_S.any()
    assert torch.allclose(outs[0].loss, outs[1].loss)
    assert grads[0].keys() <= grads[1].keys()  # the sparse step may also give explicit zeros
    for name, g in grads[1].items():
        assert torch.allclose(g, grads[0].get(name, torch.zeros_like(g))), name


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated", "prolu"])
def test_bfloat16_parameters_step_on_both_paths(arch):
    """saex trains float32 masters, but a bfloat16 SAE (loaded so, say) must still step: both paths give
    gradients in the parameters' dtype and losses alike to bfloat16's precision."""
    torch.manual_seed(0)
    kw = dict(d_in=16, d_sae=64, architecture=arch, select_precision="float32", jumprelu_bandwidth=0.5)
    dense = SAE(SAEConfig(encoder_kernel="dense", **kw)).to(torch.bfloat16)
    sparse = SAE(SAEConfig(encoder_kernel="sparse", **kw)).to(torch.bfloat16)
    sparse.load_state_dict(dense.state_dict())
    sparse.arch.recent_l0.zero_()  # as after a sparse step
    x = torch.randn(32, 16).bfloat16()
    outs = [s.train_forward(x, TrainContext(sparsity_coefficient=0.3)) for s in (dense, sparse)]
    assert torch.allclose(outs[0].loss.float(), outs[1].loss.float(), rtol=2e-2)
    for s, o in zip((dense, sparse), outs):
        o.loss.backward()
        for name, p in s.named_parameters():
            assert p.grad is None or (p.grad.dtype == torch.bfloat16 and p.grad.isfinite().all()), name


@pytest.mark.parametrize("arch, quiet, loud", [("jumprelu", ("threshold", 10.0), ("threshold", -10.0)),
                                               ("relu", ("b_enc", -10.0), ("b_enc", 10.0))])
def test_density_routing_follows_the_last_steps_l0(arch, quiet, loud):
    """The first step is dense (L0 unknown), a step after a sparse one takes the sparse kernels, a step
    after a dense one (every latent firing) autograd; both paths give the same reconstruction."""
    sae = SAE(SAEConfig(d_in=16, d_sae=64, architecture=arch, jumprelu_init_l0=0, select_precision="float32"))
    paths = []
    for name in ("sparse_forward", "dense_forward"):
        method = getattr(sae.arch, name)
        setattr(sae.arch, name, lambda *a, m=method, n=name: paths.append(n) or m(*a))
    x = torch.randn(8, 16)

    def step(setting):
        with torch.no_grad():
            sae.get_parameter(setting[0] if setting[0] == "b_enc" else f"arch.{setting[0]}").fill_(setting[1])
        return sae.train_forward(x, TrainContext())
    step(quiet)
    step(quiet)
    first = step(loud)
    second = step(loud)
    assert paths == ["dense_forward", "sparse_forward", "sparse_forward", "dense_forward"]
    assert float(sae.arch.recent_l0) == 64.0
    assert torch.allclose(first.x_hat_BD, second.x_hat_BD, atol=1e-5)


def test_a_checkpoint_without_the_routing_buffer_loads():
    """Training checkpoints written before ReLU joined the density routing lack its last L0."""
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu"))
    state = {k: v for k, v in sae.state_dict().items() if k != "arch.recent_l0"}
    sae.arch.recent_l0.zero_()
    sae.load_state_dict(state)
    assert float(sae.arch.recent_l0) == float("inf")


@pytest.mark.parametrize("case", ["small inputs", "unit inputs", "large inputs", "an outlier latent",
                                  "large biases", "some negative thresholds", "most entries pass"])
def test_low_precision_candidates_give_the_exact_jumprelu_selection(case, monkeypatch):
    from saex.sae.arch.jumprelu import kept_entries

    g = torch.Generator().manual_seed(2)
    scale = {"small inputs": 0.1, "large inputs": 30.0}.get(case, 1.0)
    x = torch.randn(64, 48, generator=g) * scale
    W = torch.randn(500, 48, generator=g) * 0.2
    b = torch.randn(500, generator=g) * (30.0 if case == "large biases" else 0.1)
    if case == "an outlier latent":
        W[7] *= 20
    z64 = x.double() @ W.double().T + b.double()
    lower = torch.quantile(z64, 0.97, dim=0).float()  # 3 % of each latent's values pass (L0 15): many sit near it
    if case == "some negative thresholds":
        lower[:50] = -0.01
    if case == "most entries pass":  # too many candidates: the full-precision GEMM decides instead
        lower = -lower.abs()
    candidates = []
    real = torch_ops.entry_dots
    monkeypatch.setattr(torch_ops, "entry_dots", lambda *a: candidates.append(a[2].numel()) or real(*a))
    rows, latents, values = kept_entries(x, W, b, lower, torch.bfloat16)
    assert bool(candidates) == (case != "most entries pass")
    got = set(zip(rows.tolist(), latents.tolist()))
    want = set(map(tuple, (z64 > lower.double()).nonzero().tolist()))
    near = (z64 - lower.double()).abs() <= 1e-5 * z64.abs().max()  # float32 rounding at the line may go either way
    assert all(near[r, s] for r, s in got ^ want), len(got ^ want)
    assert torch.allclose(values.double(), z64[rows, latents], rtol=1e-5, atol=1e-5 * float(z64.abs().max()))
    if candidates:
        assert candidates[0] <= 3 * len(want), (candidates[0], len(want))  # the bound stays tight per latent
