"""Triton kernels of the three sparse primitives (imported only where Triton is installed).

Every load is cast to the accumulator's type explicitly, so the kernels run the same under
TRITON_INTERPRET=1 on the CPU (how the tests check them on machines without a GPU). Offsets are
int64: S x D may pass 2^31. Accumulators are tiles, reduced once after their loop."""

import triton
import triton.language as tl


@triton.jit
def gather_sum_kernel(W, V, I, Offsets, Out, D, stride_w,
                      ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[m, d-block] = sum over bag m's entries e of V[e] W[I[e], d-block]; one program per (bag, d-block)."""
    m = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(Offsets + m)
    end = tl.load(Offsets + m + 1)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        idx = tl.load(I + offs_e, mask=mask_e, other=0).to(tl.int64)
        v = tl.load(V + offs_e, mask=mask_e, other=0.0).to(ACC)
        w = tl.load(W + idx[:, None] * stride_w + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :],
                    other=0.0).to(ACC)
        acc += w * v[:, None]
    tl.store(Out + m * D + offs_d, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=mask_d)


@triton.jit
def gather_dot_kernel(G, W, I, R, Out, N, D, stride_w,
                      ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[e] = <G[R[e]], W[I[e]]>; one program per block of entries."""
    offs_e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < N
    idx = tl.load(I + offs_e, mask=mask_e, other=0).to(tl.int64)
    row = tl.load(R + offs_e, mask=mask_e, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_e[:, None] & (offs_d < D)[None, :]
        g = tl.load(G + row[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        w = tl.load(W + idx[:, None] * stride_w + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        acc += w * g
    tl.store(Out + offs_e, tl.sum(acc, axis=1).to(Out.dtype.element_ty), mask=mask_e)


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
