"""Triton kernels of the three sparse primitives (imported only where Triton is installed).

Every load is cast to the accumulator's type explicitly, so the kernels run the same under
TRITON_INTERPRET=1 on the CPU (how the tests check them on machines without a GPU). Offsets are
int64: S x D may pass 2^31. Accumulators are tiles, reduced once after their loop."""

import triton
import triton.language as tl


@triton.jit
def gather_sum_kernel(W, V, I, Out, K, D, stride_w,
                      ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[b, d-block] = sum_j V[b, j] W[I[b, j], d-block]; one program per (row, d-block)."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        idx = tl.load(I + b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
        v = tl.load(V + b * K + offs_k, mask=mask_k, other=0.0).to(ACC)
        w = tl.load(W + idx[:, None] * stride_w + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :],
                    other=0.0).to(ACC)
        acc += w * v[:, None]
    tl.store(Out + b * D + offs_d, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=mask_d)


@triton.jit
def gather_dot_kernel(G, W, I, Out, K, D, stride_w,
                      ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[b, j] = <G[b], W[I[b, j]]>; one program per (row, k-block)."""
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    idx = tl.load(I + b * K + offs_k, mask=mask_k, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g = tl.load(G + b * D + offs_d, mask=mask_d, other=0.0).to(ACC)
        w = tl.load(W + idx[:, None] * stride_w + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :],
                    other=0.0).to(ACC)
        acc += w * g[None, :]
    tl.store(Out + b * K + offs_k, tl.sum(acc, axis=1).to(Out.dtype.element_ty), mask=mask_k)


@triton.jit
def scatter_rows_kernel(X, V, R, Starts, Out, D,
                        ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[s, d-block] = sum over the entries e of latent s of V[e] X[R[e], d-block].

    Entries come sorted by latent, Starts[s]:Starts[s + 1] being latent s's; each program writes its
    own output row once (no atomics, no zero-fill pass)."""
    s = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(Starts + s)
    end = tl.load(Starts + s + 1)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        r = tl.load(R + offs_e, mask=mask_e, other=0).to(tl.int64)
        v = tl.load(V + offs_e, mask=mask_e, other=0.0).to(ACC)
        x = tl.load(X + r[:, None] * D + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :],
                    other=0.0).to(ACC)
        acc += x * v[:, None]
    tl.store(Out + s * D + offs_d, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=mask_d)
