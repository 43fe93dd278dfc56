"""Triton kernels of the three sparse primitives (imported only where Triton is installed).

Every load is cast to the accumulator's type explicitly, so the kernels run the same under
TRITON_INTERPRET=1 on the CPU (how the tests check them on machines without a GPU). Offsets are
int64: S x D may pass 2^31. Accumulators are tiles, reduced once after their loop."""

import triton
import triton.language as tl


@triton.jit
def segment_sum_kernel(Src, V, I, Offsets, Out, D, stride_src,
                       ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[m, d-block] = sum over segment m's entries e of V[e] Src[I[e], d-block], segment m being the
    entries Offsets[m]:Offsets[m + 1]; one program per (segment, d-block) writes its output row once.
    The decoder's gather (segments: bags; I: latents; Src: W) and the weight gradients' scatter
    (segments: latents; I: rows; Src: X) are both this."""
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
        src = tl.load(Src + idx[:, None] * stride_src + offs_d[None, :], mask=mask_e[:, None] & mask_d[None, :],
                      other=0.0).to(ACC)
        acc += src * v[:, None]
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
def _order_key(z):
    """bfloat16 -> int32 in [0, 65535] with the floats' order (negative values' bits flipped)."""
    b = z.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where((b & 0x8000) != 0, 0xFFFF - b, b | 0x8000)


@triton.jit
def topk_rows_kernel(Z, OutV, OutI, S, K, BLOCK: tl.constexpr):
    """The K largest of each bfloat16 row of Z [B, S]: a radix select on 16-bit order keys (one
    histogram pass per byte), then one compaction pass; ties at the threshold go in index order.
    Histograms have 512 bins: real keys land in 256 + byte, lanes out of the row or the digit in bin 0."""
    row = tl.program_id(0).to(tl.int64)
    bins = tl.arange(0, 512)
    hist = tl.zeros([512], dtype=tl.int32)
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        valid = offs < S
        key = _order_key(tl.load(Z + row * S + offs, mask=valid, other=0.0))
        hist += tl.histogram(tl.where(valid, (key >> 8) + 256, 0), 512)
    cum = tl.cumsum(hist, 0, reverse=True)  # cum[b]: keys in bins >= b
    hi = tl.sum(((cum >= K) & (bins >= 256)).to(tl.int32)) - 1
    above = tl.sum(tl.where(bins == hi + 256, cum - hist, 0))  # keys whose high byte exceeds hi
    need = K - above
    hist = tl.zeros([512], dtype=tl.int32)
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        valid = offs < S
        key = _order_key(tl.load(Z + row * S + offs, mask=valid, other=0.0))
        hist += tl.histogram(tl.where(valid & ((key >> 8) == hi), (key & 255) + 256, 0), 512)
    cum = tl.cumsum(hist, 0, reverse=True)
    lo = tl.sum(((cum >= need) & (bins >= 256)).to(tl.int32)) - 1
    threshold = hi * 256 + lo
    ties = need - tl.sum(tl.where(bins == lo + 256, cum - hist, 0))  # keys equal to the threshold to take
    written = 0
    tied = 0
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        valid = offs < S
        z = tl.load(Z + row * S + offs, mask=valid, other=0.0)
        key = _order_key(z)
        equal = valid & (key == threshold)
        tie_rank = tl.cumsum(equal.to(tl.int32), 0) - 1 + tied
        keep = (valid & (key > threshold)) | (equal & (tie_rank < ties))
        pos = tl.cumsum(keep.to(tl.int32), 0) - 1 + written
        tl.store(OutI + row * K + pos, offs.to(tl.int64), mask=keep)
        tl.store(OutV + row * K + pos, z, mask=keep)
        written += tl.sum(keep.to(tl.int32))
        tied += tl.sum(equal.to(tl.int32))
