"""The sparse encoder and decoder against plain autograd: gradcheck, and equal outputs and gradients."""

import pytest
import torch
from torch.autograd import gradcheck

from saex.sae import SAE, SAEConfig
from saex.sae.arch import TrainContext
from saex.sae.kernels import topk_encode, torch_ops


def _inputs(dtype=torch.float64, B=6, d=5, S=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, dtype=dtype, generator=g)
    W = torch.randn(S, d, dtype=dtype, generator=g)  # latent-major, as the SAE keeps it
    b_enc = torch.randn(S, dtype=dtype, generator=g) * 0.1
    b_dec = torch.randn(d, dtype=dtype, generator=g) * 0.1
    return [t.requires_grad_() for t in (x, W, b_enc, b_dec)]


def test_gradcheck_float64():
    x, W, b_enc, b_dec = _inputs()
    assert gradcheck(lambda *a: topk_encode(*a, 4)[0], (x, W, b_enc, b_dec), eps=1e-6, atol=1e-6)


def test_matches_dense_autograd():
    x, W, b_enc, b_dec = _inputs()
    v, i = topk_encode(x, W, b_enc, b_dec, 4)
    z = (x - b_dec) @ W.T + b_enc
    ref_v, ref_i = z.topk(4, dim=-1, sorted=False)
    ref_v = torch.relu(ref_v)
    assert torch.equal(i, ref_i) and torch.allclose(v, ref_v)
    g = torch.randn_like(v)
    grads = torch.autograd.grad((v * g).sum(), (x, W, b_enc, b_dec))
    ref = torch.autograd.grad((ref_v * g).sum(), (x, W, b_enc, b_dec))
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_encoder_without_contiguous_rows_is_refused_by_name():
    x, W, b_enc, b_dec = _inputs()
    with pytest.raises(ValueError, match="latent-major with contiguous rows"):
        topk_encode(x, W.detach().T.contiguous().T, b_enc, b_dec, 4)


def test_sae_reads_the_latent_major_encoder_in_saelens_shape():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, k=4))
    assert sae.W_enc.shape == (8, 32) and sae.W_enc_SD.is_contiguous()
    with torch.no_grad():
        sae.W_enc[:, 3] = 7.0  # writes through the view reach the parameter
    assert torch.equal(sae.W_enc_SD[3], torch.full((8,), 7.0))


def test_scatter_rows_matches_a_dense_product():
    X = torch.randn(7, 5, dtype=torch.float64)
    idx = torch.tensor([[0, 3, 3], [2, 0, 1], [4, 4, 4], [0, 1, 2], [5, 5, 0], [1, 1, 1], [3, 2, 1]])
    val = torch.rand(7, 3, dtype=torch.float64)
    dense_BS = torch.zeros(7, 8, dtype=torch.float64).scatter_add_(1, idx, val)
    rows = torch.arange(7).repeat_interleave(3)
    out, sums = torch_ops.scatter_rows(X, val.flatten(), idx.flatten(), rows, 8)
    assert torch.allclose(out, dense_BS.T @ X)
    assert torch.allclose(sums, dense_BS.sum(0))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sae_sparse_and_dense_paths_agree(arch):
    torch.manual_seed(0)
    dense = SAE(SAEConfig(d_in=16, d_sae=64, k=5, architecture=arch, encoder_kernel="dense"))
    sparse = SAE(SAEConfig(d_in=16, d_sae=64, k=5, architecture=arch, encoder_kernel="sparse",
                           select_precision="float32"))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(32, 16)
    outs = [s.train_forward(x, TrainContext()) for s in (dense, sparse)]
    assert torch.allclose(outs[0].x_hat_BD, outs[1].x_hat_BD, atol=1e-5)
    assert torch.equal(outs[0].fired_S, outs[1].fired_S) and torch.allclose(outs[0].l0, outs[1].l0)
    for o in outs:
        o.loss.backward()
    for name in ("W_enc_SD", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(dense, name).grad, getattr(sparse, name).grad, atol=1e-5), name
    if arch == "batchtopk":
        assert dense.arch.threshold == sparse.arch.threshold > 0


def test_batchtopk_keeps_the_batch_top_k_times_b():
    sae = SAE(SAEConfig(d_in=8, d_sae=40, k=3, architecture="batchtopk"))
    z = torch.randn(6, 40)
    code = sae.arch.kept(z)
    dense = torch.zeros(6, 40).index_put_((code.rows(), code.indices_N), code.values_N, accumulate=True)
    f = z.relu().flatten()
    expected = torch.zeros_like(f)
    top = f.topk(18).indices
    expected[top] = f[top]
    assert torch.equal(dense.flatten(), expected)


def test_batchtopk_of_an_empty_batch_keeps_nothing():
    sae = SAE(SAEConfig(d_in=8, d_sae=40, k=3, architecture="batchtopk"))
    code = sae.arch.kept(torch.zeros(0, 40))
    assert code.values_N.numel() == 0 and code.offsets.tolist() == [0]


def test_bfloat16_selection_picks_nearly_the_same_latents():
    x, W, b_enc, b_dec = (t.detach().float() for t in _inputs(B=64, d=32, S=256))
    exact = topk_encode(x, W, b_enc, b_dec, 8)[1]
    fast = topk_encode(x, W, b_enc, b_dec, 8, torch.bfloat16)[1]
    overlap = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), fast.tolist())) / exact.numel()
    assert overlap > 0.95


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead, dead_rows", [(None, slice(0, 5)), (9, slice(0, 5)), (4, slice(0, 0))])
def test_sparse_auxk_matches_the_dense_autograd_path(arch, n_dead, dead_rows):
    """AuxK rides in the sparse encode (its entries joined to the kept ones, row by row): the same losses
    and gradients as the dense path, also when the host's count of the dead is stale (more counted than
    dead: live latents fill in with zeros; none dead: the AuxK term is 0)."""
    torch.manual_seed(0)
    cfgs = [SAEConfig(d_in=8, d_sae=32, k=3, architecture=arch, encoder_kernel=kernel, select_precision="float32")
            for kernel in ("dense", "sparse")]
    dense, sparse = SAE(cfgs[0]), SAE(cfgs[1])
    sparse.load_state_dict(dense.state_dict())
    dead = torch.zeros(32, dtype=torch.bool)
    dead[dead_rows] = True
    x = torch.randn(10, 8)
    outs = [s.train_forward(x, TrainContext(dead_S=dead, n_dead=n_dead)) for s in (dense, sparse)]
    assert outs[0].losses.keys() == outs[1].losses.keys() and "auxk" in outs[0].losses
    for name in outs[0].losses:
        assert torch.allclose(outs[0].losses[name], outs[1].losses[name], atol=1e-6), name
    if not dead.any():
        assert outs[0].losses["auxk"] == 0
    for o in outs:
        o.loss.backward()
    for name in ("W_enc_SD", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(getattr(dense, name).grad, getattr(sparse, name).grad, atol=1e-5), name


def test_join_rows_puts_each_rows_entries_together():
    from saex.sae.code import Bags, join_rows

    a = Bags(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10, 11, 12, 13]), torch.tensor([0, 2, 2, 4]), 20)
    b = Bags(torch.tensor([5.0, 6, 7]), torch.tensor([14, 15, 16]), torch.tensor([0, 1, 3, 3]), 20)
    joined, pos_a, pos_b = join_rows(a, b)
    assert joined.offsets.tolist() == [0, 3, 5, 7]
    assert joined.values_N.tolist() == [1, 2, 5, 6, 7, 3, 4]
    assert joined.indices_N.tolist() == [10, 11, 14, 15, 16, 12, 13]
    assert torch.equal(joined.values_N[pos_a], a.values_N) and torch.equal(joined.indices_N[pos_b], b.indices_N)


def test_partition_keeps_each_sides_order():
    from saex.sae.code import partition

    mask = torch.tensor([True, False, False, True, True, False])
    inside, outside = partition(mask)
    assert inside.tolist() == [0, 3, 4] and outside.tolist() == [1, 2, 5]
    assert [t.tolist() for t in partition(torch.zeros(0, dtype=torch.bool))] == [[], []]


def test_dense_metrics_count_active_entries():
    """L0 and fired latents of a dense code: nonzero entries (NaN too, -0.0 not), an empty batch fires none."""
    from saex.sae.code import active_counts, fired_columns

    f = torch.tensor([[0.0, 2.0, -0.0, 0.5], [0.0, 0.0, 0.0, float("nan")]], dtype=torch.bfloat16)
    assert active_counts(f.bool(), -1).tolist() == [2, 1]
    assert fired_columns(f.bool()).tolist() == [False, True, False, True]
    assert fired_columns(torch.zeros(0, 7, dtype=torch.bool)).tolist() == [False] * 7
    with pytest.raises(TypeError, match="bool"):
        fired_columns(f)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["gaussian", "skewed rows", "few positives", "heavy tail", "misleading sample"])
def test_batch_top_n_equals_a_full_top_k_of_relu(case, dtype):
    """top_n of z (negatives and all: on CPUs it ranks integer keys) keeps what a full top-k of ReLU(z) keeps."""
    from saex.sae.arch.topk import top_n

    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 611, generator=g)  # 64 x 611 entries: top_n samples every 61st
    if case == "skewed rows":
        z *= torch.linspace(0.1, 5, 64)[:, None]
    elif case == "few positives":
        z -= 2.5
    elif case == "heavy tail":
        z = z.exp() ** 3
    z = z.flatten()
    if case == "misleading sample":  # the strided sample sees only large values: the full top-k must take over
        assert z.numel() % 61
        z = z.abs() + 0.01
        z[::61] += 100
    z = z.to(dtype)
    n = 64 * 8
    positions, values = top_n(z, n)
    ref = z.relu().float().topk(n)
    kth = ref.values[-1] if (ref.values > 0).all() else 0.0  # ties at the n-th value may go either way
    assert len(positions) == int((ref.values > 0).sum())
    assert set(ref.indices[ref.values > kth].tolist()) <= set(positions.tolist())
    assert bool((values.float() >= kth).all()) and torch.equal(values, z[positions])


def test_float32_selection_holds_under_an_enclosing_autocast():
    x, W, b_enc, b_dec = (t.detach().float() for t in _inputs(B=16, d=8, S=64))
    plain = topk_encode(x, W, b_enc, b_dec, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = topk_encode(x, W, b_enc, b_dec, 4)
    assert torch.equal(plain[0], inside[0]) and torch.equal(plain[1], inside[1])


@pytest.mark.parametrize("G, k, dtype", [(16, 32, torch.bfloat16), (8, 5, torch.bfloat16), (64, 1, torch.bfloat16),
                                         (16, 32, torch.float32), (16, 7, torch.float64)])
def test_grouped_topk_selects_what_torch_topk_selects(G, k, dtype):
    """Rows with the top k packed into one group, spread one per group, tied (many equal values inside
    and at the k-th), all equal, and negative (which the CPU's integer keys rank in reverse: ReLU makes
    them alike); every float width."""
    from saex.sae.kernels.dispatch import grouped_topk

    g = torch.Generator().manual_seed(G)
    S = 64 * G
    z = torch.randn(6, S, generator=g)
    z[0, 5 * G: 5 * G + min(k, G)] = 10.0 + torch.arange(min(k, G)).float()  # the largest in one group
    z[1, ::G] += 20.0  # one large entry in every group
    z[2, : S // 3] = 1.0  # ties inside the top k
    z[3] = 0.5
    z[4] = -z[4].abs()
    z = z.to(dtype)
    indices = grouped_topk(z, k, G)
    expected = z.relu().topk(k, dim=-1).values
    assert torch.equal(z.gather(1, indices).relu().sort(-1).values, expected.sort(-1).values)
    assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cpu_relu_topk_ranks_like_torch_topk_of_the_relu(dtype):
    """The integer-key ranking: large and tiny positives, ties, -inf, rows with fewer than k positive
    entries (padded with zeros) and rows all negative; the values carry z's gradient."""
    from saex.sae.kernels.dispatch import relu_topk_rows

    g = torch.Generator().manual_seed(3)
    k, S = 7, 200
    z = torch.randn(6, S, generator=g) * torch.logspace(-3, 3, S)[torch.randperm(S, generator=g)]
    z[1, :50] = 0.25  # ties across the k-th
    z[2] = -z[2].abs()
    z[2, [3, 9]] = torch.tensor([2.0, 1e-4])  # two positives among negatives
    z[3] = float("-inf")
    z[4, ::3] = float("-inf")
    z = z.to(dtype).requires_grad_()
    values, indices = relu_topk_rows(z, k)
    expected = torch.relu(z.detach()).topk(k, dim=-1).values
    assert torch.equal(values.detach().sort(-1).values, expected.sort(-1).values)
    assert torch.equal(torch.relu(z.detach().gather(1, indices)), values.detach())
    assert all(len(set(row)) == k for row in indices.tolist())
    values.sum().backward()
    positive = z.detach().gather(1, indices) > 0
    assert torch.equal(z.grad, torch.zeros_like(z).scatter_(1, indices, positive.to(dtype)))


def test_cpu_relu_topk_picks_a_nan_as_torch_topk_does():
    """inf - inf is a NaN with its sign bit set on x86: read as an integer it would rank below every
    positive entry; torch.topk ranks it largest, and so must the CPU path (a diverged latent shows)."""
    from saex.sae.kernels.dispatch import relu_topk_rows

    z = torch.rand(4, 3, 64)  # three dimensions, as an encode over [batch, seq, d]
    nan = torch.tensor(float("inf")) - torch.tensor(float("inf"))
    z[1, 2, 17] = nan
    for dtype in (torch.float32, torch.bfloat16):
        values, indices = relu_topk_rows(z.to(dtype), 5)
        assert indices[1, 2].eq(17).any()
        assert values.isnan().sum() == 1
        expected = torch.relu(z.to(dtype)).topk(5, dim=-1).indices
        assert torch.equal(indices.sort(-1).values, expected.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_positive_mask_is_z_above_zero_with_nan_kept(dtype):
    """On integer keys and on floats alike: positives kept, zeros of either sign and negatives not, a NaN
    (x86's, sign bit set) kept so that a diverged latent reaches the loss."""
    from saex.sae.kernels.dispatch import positive_mask

    z = torch.tensor([[1.5, -0.0, 0.0, -2.0, 1e-30, float("-inf"), float("inf")]]).to(dtype)
    want = [True, False, False, False, True, False, True]
    assert positive_mask(z).tolist() == [want]
    z[0, 1] = torch.tensor(float("inf")) - torch.tensor(float("inf"))
    want[1] = True
    assert positive_mask(z).tolist() == [want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_positive_mask_with_a_bound_is_z_above_its_maximum_with_zero(dtype):
    """z > max(lower, 0) per latent, exactly, whatever z's dtype: a float32 bound that z's dtype cannot
    hold is not rounded up past a z above it; negative and -0.0 bounds act as 0; NaN is kept."""
    from saex.sae.kernels.dispatch import positive_mask

    lower = torch.tensor([0.3, 0.3, -0.0, -2.0, 1.0, 0.0])
    z = torch.tensor([[0.3, 0.2999, 0.0, -1.0, float("nan"), 1e-30]]).to(dtype)
    want = (z.double() > lower.double().clamp_min(0)) | z.isnan()
    assert positive_mask(z, lower).tolist() == want.tolist()
    assert want[0, 0] == (dtype in (torch.bfloat16, torch.float16))  # 0.3 rounds up in those: above the bound


def test_torch_path_refuses_an_out_of_range_latent_by_value():
    """aten's kernels would write past the gradient's end; the torch path names the bad index instead."""
    from saex.sae.kernels import torch_ops

    with pytest.raises(IndexError, match=r"\[0, 600\); got 700"):
        torch_ops.scatter_rows(torch.randn(2, 4), torch.randn(2), torch.tensor([0, 700]), torch.tensor([0, 1]), 600)
    with pytest.raises(IndexError, match=r"\[0, 600\); got -1"):
        torch_ops.entry_dots(torch.randn(1, 4), torch.randn(600, 4), torch.tensor([3, -1]), torch.tensor([0, 2]))
