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
def _order_key(z):
    """bfloat16 -> int32 in [0, 65535] with the floats' order (negative values' bits flipped)."""
    b = z.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where((b & 0x8000) != 0, 0xFFFF - b, b | 0x8000)


@triton.jit
def _count_at_least(z_row, S, t, BLOCK: tl.constexpr):
    """How many keys of the row are >= t."""
    n = 0
    for s0 in range(0, S, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        key = _order_key(tl.load(z_row + offs, mask=offs < S, other=0.0))
        n += tl.sum(((key >= t) & (offs < S)).to(tl.int32))
    return n


@triton.jit
def _compact(z_row, out_v, out_i, S, front, tie, room, BLOCK: tl.constexpr, CAP: tl.constexpr,
             TIES: tl.constexpr, STAGES: tl.constexpr):
    """Writes the entries whose key is >= front to slots 0, 1, ... (those past CAP are dropped) and, with
    TIES, up to `room` entries whose key equals `tie` to slots CAP - 1, CAP - 2, ...; returns how many
    keys were >= front."""
    written = 0
    tied = 0
    for s0 in tl.range(0, S, BLOCK, num_stages=STAGES):  # stages > 1: the next blocks' loads in flight
        offs = s0 + tl.arange(0, BLOCK)
        valid = offs < S
        z = tl.load(z_row + offs, mask=valid, other=0.0)
        key = _order_key(z)
        keep = valid & (key >= front)
        pos = written + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(out_v + pos, z, mask=keep & (pos < CAP))
        tl.store(out_i + pos, offs.to(tl.int64), mask=keep & (pos < CAP))
        written += tl.sum(keep.to(tl.int32))
        if TIES:
            equal = valid & (key == tie)
            rank = tied + tl.cumsum(equal.to(tl.int32), 0) - 1
            tl.store(out_v + CAP - 1 - rank, z, mask=equal & (rank < room))
            tl.store(out_i + CAP - 1 - rank, offs.to(tl.int64), mask=equal & (rank < room))
            tied += tl.sum(equal.to(tl.int32))
    return written


@triton.jit
def topk_candidates_kernel(Z, OutV, OutI, Count, S, J, STRIDE: tl.constexpr, SAMPLE: tl.constexpr,
                           BLOCK: tl.constexpr, CAP: tl.constexpr, STAGES: tl.constexpr):
    """CAP candidate slots per bfloat16 row of Z [B, S] (the rest: -inf), and Count[row], how many keys
    passed: the threshold is the J-th largest key of every STRIDE-th entry (J x STRIDE ~ 4 K, so about
    4 K entries pass it), found by bisection in registers; one pass then writes the entries above it.
    topk_repair_kernel redoes the rows where fewer than K or more than CAP passed."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * S
    slots = tl.arange(0, CAP)
    tl.store(OutV + row * CAP + slots, tl.full([CAP], float("-inf"), dtype=tl.float32).to(OutV.dtype.element_ty))
    sample = tl.arange(0, SAMPLE) * STRIDE
    skey = tl.where(sample < S, _order_key(tl.load(z_row + sample, mask=sample < S, other=0.0)), -1)
    lo = 0
    hi = 65536
    for _ in range(17):  # invariant: >= J sampled keys are >= lo, fewer than J are >= hi
        mid = (lo + hi) // 2
        enough = tl.sum((skey >= mid).to(tl.int32)) >= J
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    n = _compact(z_row, OutV + row * CAP, OutI + row * CAP, S, lo, -1, 0, BLOCK, CAP, False, STAGES)
    tl.store(Count + row, n)


@triton.jit
def topk_repair_kernel(Z, OutV, OutI, Count, S, K, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """The rows of topk_candidates_kernel where fewer than K or more than CAP keys passed (rare; the
    others return at once): bisect over the row's keys until a threshold lets K to CAP through, or, when
    ties make that impossible, take every key above the K-th largest plus enough of the keys equal to it."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(Count + row)
    if (n < K) | (n > CAP):
        z_row = Z + row * S
        out_v = OutV + row * CAP
        out_i = OutI + row * CAP
        # invariant: >= K keys are >= lo (more than CAP unless lo = 0), fewer than K (n_hi) are >= hi
        lo = 0
        hi = 65536
        n_hi = 0
        t = -1
        while (t < 0) & (hi - lo > 1):
            mid = (lo + hi) // 2
            c = _count_at_least(z_row, S, mid, BLOCK)
            if c < K:
                hi = mid
                n_hi = c
            elif c > CAP:
                lo = mid
            else:
                t = mid
        slots = tl.arange(0, CAP)
        tl.store(out_v + slots, tl.full([CAP], float("-inf"), dtype=tl.float32).to(OutV.dtype.element_ty))
        if t >= 0:
            _compact(z_row, out_v, out_i, S, t, -1, 0, BLOCK, CAP, False, 1)
        else:  # every key above lo, then keys equal to lo into the slots left
            _compact(z_row, out_v, out_i, S, hi, lo, CAP - n_hi, BLOCK, CAP, True, 1)
