"""Triton kernels of the three sparse primitives (imported only where Triton is installed).

Every load is cast to the accumulator's type explicitly, so the kernels run the same under
TRITON_INTERPRET=1 on the CPU (how the tests check them on machines without a GPU). Offsets are
int64: S x D may pass 2^31. Accumulators are tiles, reduced once after their loop."""

import triton
import triton.language as tl


@triton.jit
def segment_sum_kernel(Src, V, I, Offsets, Out, Sums, D, stride_src,
                       ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, SUMS: tl.constexpr):
    """Out[m, d-block] = sum over segment m's entries e of V[e] Src[I[e], d-block], segment m being the
    entries Offsets[m]:Offsets[m + 1]; one program per (segment, d-block) writes its output row once.
    The decoder's gather (segments: bags; I: latents; Src: W) and the weight gradients' scatter
    (segments: latents; I: rows; Src: X) are both this. With SUMS, Sums[m] = sum of the segment's V
    (the bias gradient beside the weights'), in a fixed order: no atomics, the same bits every run."""
    m = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(Offsets + m)
    end = tl.load(Offsets + m + 1)
    acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC)
    v_acc = tl.zeros([BLOCK_E], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        idx = tl.load(I + offs_e, mask=mask_e, other=0).to(tl.int64)
        v = tl.load(V + offs_e, mask=mask_e, other=0.0).to(ACC)
        src = tl.load(Src + idx[:, None] * stride_src + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :],
                      other=0.0).to(ACC)
        acc += src * v[:, None]
        v_acc += v
    tl.store(Out + m * D + offs_d, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=mask_d)
    if SUMS:
        tl.store(Sums + m, tl.sum(v_acc, axis=0).to(Sums.dtype.element_ty), mask=tl.program_id(1) == 0)


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
def group_max_kernel(Z, Out, N, G: tl.constexpr, BLOCK: tl.constexpr):
    """Out[j] = max of Z[j G : (j + 1) G] for the N groups of a flat Z; one program per BLOCK groups."""
    groups = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = groups[:, None] * G + tl.arange(0, G)[None, :]
    z = tl.load(Z + offs, mask=(groups < N)[:, None], other=float("-inf"))
    zf = z.to(tl.float32)  # (compared in float32: the interpreter compares bfloat16 by its bits)
    nan = tl.max((zf != zf).to(tl.int32), axis=1) > 0  # a NaN is the largest, as torch.amax and torch.topk have it
    tl.store(Out + groups, tl.where(nan, float("nan"), tl.max(z, axis=1)).to(Out.dtype.element_ty), mask=groups < N)
