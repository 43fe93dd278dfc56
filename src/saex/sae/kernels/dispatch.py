"""Which backend serves a tensor, and the entry points that accept codes in top-k form or as bags."""

from __future__ import annotations

import os

import torch

from saex.sae.kernels import torch_ops, triton_ops


def backend(t: torch.Tensor):
    """The module whose primitives serve tensors like `t`: Triton on CUDA, torch elsewhere."""
    return triton_ops if triton_ops.usable(t) else torch_ops


def decode(W_SD: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
           offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sums of rows of W, differentiable in W and the values. Either a code in top-k form
    (values and indices [B, K]) -> [B, D], or flat entries [N] in bags: bag m holds the entries
    offsets[m]:offsets[m + 1] (offsets [M + 1], no padding) -> [M, D]."""
    if offsets is None:
        B, K = indices.shape
        offsets = torch.arange(0, B * K + 1, K, device=indices.device)
    return backend(W_SD).decode(W_SD, values.reshape(-1), indices.reshape(-1), offsets)


class ProbeValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_MD, W_SD, probes_N, indices_N, offsets):
        ctx.save_for_backward(W_SD, indices_N, offsets)
        return out_MD.view_as(out_MD)

    @staticmethod
    def backward(ctx, grad_MD):
        W_SD, indices_N, offsets = ctx.saved_tensors
        grad_probes = backend(W_SD).entry_dots(grad_MD, W_SD.detach(), indices_N, offsets) \
            if ctx.needs_input_grad[2] else None
        return grad_MD, None, grad_probes, None, None


def probe_values(out_MD: torch.Tensor, W_SD: torch.Tensor, probes_N: torch.Tensor, indices_N: torch.Tensor,
                 offsets: torch.Tensor) -> torch.Tensor:
    """`out` (a decode's output) unchanged, through which zero-valued entries in bags (probes [N], latent
    indices [N], offsets [M + 1]) receive the gradient decode's backward would give them,
    dL/dprobe[e] = <dL/dout[m], W[indices[e]]>, without their gather or their (zero) scatter into W."""
    return ProbeValues.apply(out_MD, W_SD, probes_N, indices_N, offsets)


# the group size of the grouped top-k per device type, as measured (benchmarks/kernels.py on an H100; on 2
# CPU cores at 1,024 x 6,144: 5.4 ms with groups of 16, 6.4 with 32, 7.6 for torch.topk alone)
TOPK_GROUP = {"cuda": 32, "cpu": 16}


def relu_topk_rows(z_BS: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k largest entries of ReLU(z), unordered, the values carrying z's
    gradient (rows with fewer than k positive entries are padded with zeros at arbitrary latents).

    Through `grouped_topk` where the rows split into enough groups (SAEX_TOPK=torch keeps torch.topk),
    else torch.topk; both rank `ranking_keys`."""
    S = z_BS.shape[-1]
    G = TOPK_GROUP.get(z_BS.device.type, TOPK_GROUP["cpu"])
    if z_BS.dim() == 2 and S % G == 0 and S // G >= 4 * k and os.environ.get("SAEX_TOPK", "auto") != "torch":
        indices = grouped_topk(z_BS, k, G)
    else:
        indices = ranking_keys(z_BS).topk(k, dim=-1, sorted=False).indices
    return torch.relu(z_BS.gather(-1, indices)), indices


def positive_mask(z: torch.Tensor, lower_S: torch.Tensor | None = None) -> torch.Tensor:
    """z > max(lower, 0), lower per latent (z > 0 without it), NaN counting as above (so that a diverged
    latent shows in the loss); on CPUs over `ranking_keys` (3.1 against 4.6 ms at 1,024 x 6,144 bfloat16
    on 2 cores), whose order holds for non-negative bounds. A bound finer than z's dtype is rounded down
    to it, which keeps the comparison exact (z > bound iff z > the largest value of z's dtype <= bound)."""
    # 0 as an int: a float scalar would promote the integer keys to a float copy (5 ms at 1,024 x 6,144)
    bound = 0 if lower_S is None else _round_down(torch.where(lower_S.detach() > 0, lower_S.detach(), 0.0), z.dtype)
    keys = ranking_keys(z)
    if keys.dtype == z.dtype:
        return ~(z.detach() <= bound)
    return keys > (bound if lower_S is None else bound.contiguous().view(keys.dtype))


def _round_down(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, rounded toward -inf where it is not representable."""
    low = t.to(dtype)
    return torch.where(low.to(t.dtype) > t, torch.nextafter(low, torch.full_like(low, float("-inf"))), low)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def ranking_keys(z: torch.Tensor) -> torch.Tensor:
    """Keys (detached) that order z's positive entries as z does and read its negative ones as negative,
    for selections of ReLU(z). On CPUs, z's bit patterns read as integers of the same width: torch's
    integer comparisons skip the NaN tests of its float ones. z itself elsewhere, and when z holds a NaN
    (which its sum, 0.16 ms, shows): x86's usual NaN has its sign bit set and would read as negative,
    where torch's float comparisons rank NaN largest, so that a diverged latent still shows."""
    z = z.detach()
    if z.device.type != "cpu" or z.element_size() not in _SAME_WIDTH_INT or z.sum().isnan():
        return z
    return z.view(_SAME_WIDTH_INT[z.element_size()])


def grouped_topk(z_BS: torch.Tensor, k: int, G: int) -> torch.Tensor:
    """The latents of torch.topk's selection of ReLU(z) (ties aside; it ranks `ranking_keys`), found
    through the rows' groups of G entries  -> indices [B, k], unordered. The k largest entries lie in the
    k groups with the largest maxima (an entry outside them has k group maxima at least as large above
    it), so a top-k over the group maxima, then over those k G entries, finds them while reading z once.
    S must be a multiple of G."""
    B, S = z_BS.shape
    keys = ranking_keys(z_BS)
    maxima = triton_ops.group_max(keys, G) if triton_ops.usable(keys) else keys.reshape(B, S // G, G).amax(-1)
    groups_BK = maxima.topk(k, dim=-1, sorted=False).indices
    # the chosen groups as rows of a [B * S / G, G] view: one row gather (a gather of [B, k, G] through an
    # expanded index takes 1.5 against 0.2 ms on 2 CPU cores)
    flat_groups = (groups_BK + torch.arange(B, device=z_BS.device)[:, None] * (S // G)).reshape(-1)
    candidates = keys.reshape(B * S // G, G).index_select(0, flat_groups).view(B, k * G)
    slots = candidates.topk(k, dim=-1, sorted=False).indices
    entries = (groups_BK[..., None] * G + torch.arange(G, device=z_BS.device)).reshape(B, k * G)
    return entries.gather(1, slots)
