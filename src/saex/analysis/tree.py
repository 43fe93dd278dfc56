"""Feature trees across SAE widths and Matryoshka prefixes (seed 004): which latent of a narrower SAE is
the parent of each latent of a wider one, judged by their activations on the same rows.

The score of a (parent a, child b) pair is the directed masked cosine similarity: the cosine of a's and
b's activations over the rows where b fires (activation > 0), times max(act_b) / max(act_a) (maxima over
all rows), which discounts parents that fire far harder than the child. Every pair scoring above a
threshold (0.6) is an edge of a DAG; the tree keeps each child's highest-scoring parent.

The sums behind the cosine are sparse-times-sparse products over the codes: for each child b,
  G[a, b] = sum_n a_n b_n               (b_n = 0 off b's rows, so this is the masked dot product)
  H[a, b] = sum_{n: b_n > 0} a_n^2      (a's squared norm on b's rows)
  Q[b]    = sum_n b_n^2
and cos = G / sqrt(H Q). They are accumulated from the code's entries only: each firing entry of b
meets the K entries of a on its row, so the work is nnz(B) x K_a, never N x S_a x S_b. Children go in
chunks whose [S_a, chunk] sums live in reused buffers of `cells` floats, of which only the touched cells
are read and reset, so 65k x 65k latents fit in memory (1.1 GB for 65k rows of k 64: docs/trees.md).

Activations are a dense [N, S] tensor or a saex.sae.code.Code; entries <= 0 count as not firing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saex.sae.code import Code

THRESHOLD = 0.6
CELLS = 1 << 23  # dense [S_a, chunk] float32 sums per chunk of children (32 MB each)
PAIRS = 1 << 22  # (child entry, parent entry) products accumulated at once


def as_code(acts) -> Code:
    """A Code of dense [N, S] activations (a Code is returned as is)."""
    if isinstance(acts, Code):
        return acts
    if not isinstance(acts, torch.Tensor) or acts.dim() != 2:
        raise ValueError(f"activations must be a dense [N, S] tensor or a Code, got {type(acts).__name__} "
                         f"{tuple(getattr(acts, 'shape', ()))}")
    return Code.from_dense(acts)


def cat_codes(codes: list[Code]) -> Code:
    """Codes of consecutive row batches as one (rows with fewer entries padded with zeros)."""
    if not codes:
        raise ValueError("no codes to join")
    k = max(c.values_BK.shape[-1] for c in codes)
    pad = lambda t: torch.nn.functional.pad(t, (0, k - t.shape[-1]))  # noqa: E731 (zeros: value 0 never fires)
    return Code(torch.cat([pad(c.values_BK.float()) for c in codes]), torch.cat([pad(c.indices_BK) for c in codes]),
                codes[0].d_sae)


def _firing(code: Code, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(values_NK float32 with non-firing entries zeroed, indices_NK int64) on `device`."""
    v = code.values_BK.detach().to(device, torch.float32)
    return v.clamp_min(0), code.indices_BK.detach().to(device, torch.int64)


def latent_max(code: Code, device=None) -> torch.Tensor:
    """[S] float32: each latent's largest activation over the rows (0 if it never fires)."""
    v, i = _firing(code, device or code.values_BK.device)
    return torch.zeros(code.d_sae, device=v.device).scatter_reduce_(0, i.flatten(), v.flatten(), "amax")


@dataclass
class Children:
    """B's firing entries sorted by child: child b's are rows_E[offsets[b]:offsets[b + 1]]."""

    rows_E: torch.Tensor
    values_E: torch.Tensor
    offsets_S: torch.Tensor  # [S_b + 1]
    sq_S: torch.Tensor  # [S_b]: sum of b^2
    max_S: torch.Tensor  # [S_b]

    @staticmethod
    def of(code: Code, device) -> "Children":
        v, i = _firing(code, device)
        N, K = v.shape
        rows = torch.arange(N, device=device).repeat_interleave(K)
        v, i = v.flatten(), i.flatten()
        keep = v > 0
        rows, v, i = rows[keep], v[keep], i[keep]
        i, order = i.sort(stable=True)
        counts = torch.bincount(i, minlength=code.d_sae)
        offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
        sq = torch.zeros(code.d_sae, device=device).index_add_(0, i, v[order] ** 2)
        mx = torch.zeros(code.d_sae, device=device).scatter_reduce_(0, i, v[order], "amax")
        return Children(rows[order], v[order], offsets, sq, mx)

    def fires(self) -> torch.Tensor:
        """[S_b] int64: rows each child fires on."""
        return self.offsets_S.diff()


class _Buffers:
    """Dense [S_a x chunk] sums, reused by every chunk: only the cells a chunk touched are read and reset, so
    a chunk costs its (child entry, parent entry) products, not S_a x chunk (the dense sweep dominated: 240 s
    of 8,192 rows at 65k x 65k latents on 2 busy cores, against 5 s for the products themselves)."""

    def __init__(self, cells: int, device):
        self.G = torch.zeros(cells, device=device)
        self.H = torch.zeros(cells, device=device)
        self.owner = torch.zeros(cells, dtype=torch.int64, device=device)
        self.marked = torch.zeros(cells, dtype=torch.bool, device=device)


def _chunk_sums(va_NK, ia_NK, ch: Children, c0: int, c1: int, pairs: int, buf: _Buffers):
    """(parent, child - c0, G, H) of the module docstring for every pair of parent and child c0..c1-1 that
    co-fire (each pair once)."""
    C = c1 - c0
    e0, e1 = int(ch.offsets_S[c0]), int(ch.offsets_S[c1])
    child_E = torch.repeat_interleave(torch.arange(C, device=va_NK.device), ch.offsets_S[c0:c1 + 1].diff(),
                                      output_size=e1 - e0)
    step = max(1, pairs // max(va_NK.shape[1], 1))
    found = []
    for s in range(e0, e1, step):
        hi = min(s + step, e1)
        rows, vb, cl = ch.rows_E[s:hi], ch.values_E[s:hi], child_E[s - e0:hi - e0]
        va, ia = va_NK[rows], ia_NK[rows]  # [E, K_a]: the parents' entries on these rows
        fired = va > 0
        flat = (ia * C + cl[:, None])[fired]
        va = va[fired]
        buf.G.index_add_(0, flat, va * vb[:, None].expand_as(fired)[fired])
        buf.H.index_add_(0, flat, va * va)
        order = torch.arange(len(flat), device=flat.device)
        buf.owner[flat] = order  # of repeated cells one write wins: that entry stands for the cell
        cells = flat[buf.owner[flat] == order]
        cells = cells[~buf.marked[cells]]  # not already found by an earlier step of this chunk
        buf.marked[cells] = True
        found.append(cells)
    keys = torch.cat(found) if found else torch.zeros(0, dtype=torch.int64, device=va_NK.device)
    g, h = buf.G[keys], buf.H[keys]
    buf.G[keys], buf.H[keys], buf.marked[keys] = 0.0, 0.0, False
    return keys // C, keys % C, g, h


def _scores(g, h, sq, max_a, max_b) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, score) elementwise (arguments broadcast): cos = g / sqrt(h sq), score = cos max_b / max_a."""
    zero = torch.zeros((), device=g.device)
    cos = torch.where(h > 0, g / (h * sq).sqrt().clamp_min(1e-30), zero)
    return cos, cos * torch.where(max_a > 0, max_b / max_a.clamp_min(1e-30), zero)


def masked_scores(acts_a, acts_b, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos [S_a, S_b], score [S_a, S_b]), dense: every pair's directed masked cosine and its score
    (for small SAEs and tests; tree_edges gives the edges of large ones)."""
    a, b = as_code(acts_a), as_code(acts_b)
    device = device or a.values_BK.device
    va, ia = _firing(a, device)
    ch = Children.of(b, device)
    p, c, g, h = _chunk_sums(va, ia, ch, 0, b.d_sae, PAIRS, _Buffers(a.d_sae * b.d_sae, device))
    cos, score = _scores(g, h, ch.sq_S[c], latent_max(a, device)[p], ch.max_S[c])
    dense = lambda v: torch.zeros(a.d_sae, b.d_sae, device=device).index_put_((p, c), v)  # noqa: E731
    return dense(cos), dense(score)


@dataclass
class Edges:
    """The DAG's edges (score > threshold) and the tree by best parent, over one (parents, children) pair."""

    parent_E: torch.Tensor  # int64
    child_E: torch.Tensor  # int64
    score_E: torch.Tensor  # float32
    cos_E: torch.Tensor  # float32
    best_parent_S: torch.Tensor  # int64 [S_b]: the highest-scoring parent of each child; -1: no edge
    fires_S: torch.Tensor  # int64 [S_b]: rows each child fires on
    threshold: float


def tree_edges(acts_a, acts_b, threshold: float = THRESHOLD, parent_end_S: torch.Tensor | None = None,
               device=None, cells: int = CELLS, pairs: int = PAIRS,
               on_chunk: Callable[[int], None] | None = None, timed=None) -> Edges:
    """Edges from the latents of A (parents) to those of B (children) whose score passes `threshold`, and each
    child's best parent. `parent_end_S` [S_b] (optional) limits child b's parents to latents < parent_end_S[b]
    (Matryoshka levels); `on_chunk(n)` is told each time n more children are done (a progress bar); `timed()`,
    a context manager, wraps each chunk (saex.threads.ThreadTuner.timed: a chunk is many small indexing ops,
    which 2 threads run 10x slower than 1 when another process holds a core)."""
    a, b = as_code(acts_a), as_code(acts_b)
    if a.values_BK.shape[0] != b.values_BK.shape[0]:
        raise ValueError(f"A and B must hold the same rows, got {a.values_BK.shape[0]} and {b.values_BK.shape[0]}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (a pair that never co-fires scores 0), got {threshold}")
    device = torch.device(device or a.values_BK.device)
    S_a, S_b = a.d_sae, b.d_sae
    va, ia = _firing(a, device)
    ch = Children.of(b, device)
    max_a = latent_max(a, device)
    ends = None if parent_end_S is None else torch.as_tensor(parent_end_S, device=device)
    chunk = max(1, min(S_b, cells // max(S_a, 1)))
    buf = _Buffers(S_a * chunk, device)
    out: dict[str, list[torch.Tensor]] = {"p": [], "c": [], "s": [], "cos": []}
    best = torch.full((S_b,), -1, dtype=torch.int64, device=device)
    for c0 in range(0, S_b, chunk):
        c1 = min(S_b, c0 + chunk)
        with timed() if timed else contextlib.nullcontext():
            p, c, g, h = _chunk_sums(va, ia, ch, c0, c1, pairs, buf)  # only pairs that co-fire can score above 0
            if ends is not None:
                ok = p < ends[c0 + c]
                p, c, g, h = p[ok], c[ok], g[ok], h[ok]
            cos, score = _scores(g, h, ch.sq_S[c0 + c], max_a[p], ch.max_S[c0 + c])
            keep = score > threshold
            p, c, score, cos = p[keep], c[keep], score[keep], cos[keep]
            if len(c):
                top = torch.zeros(c1 - c0, device=device).scatter_reduce_(0, c, score, "amax", include_self=False)
                first = torch.full((c1 - c0,), S_a, dtype=torch.int64, device=device)
                first.scatter_reduce_(0, c[score == top[c]], p[score == top[c]], "amin")  # ties: the lowest parent
                best[c0:c1] = torch.where(first < S_a, first, -1)
            c = c + c0
            for k, v in zip(out, (p, c, score, cos)):
                out[k].append(v)
        if on_chunk:
            on_chunk(c1 - c0)
    cat = lambda k, dt: torch.cat(out[k]).to(dt).cpu() if out[k] else torch.zeros(0, dtype=dt)  # noqa: E731
    return Edges(cat("p", torch.int64), cat("c", torch.int64), cat("s", torch.float32), cat("cos", torch.float32),
                 best.cpu(), ch.fires().cpu(), threshold)


def group_ranges(ends: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of each Matryoshka group from the prefixes' exclusive ends M_1 < ... < M_G."""
    return list(zip([0, *ends[:-1]], ends))


def prefix_parent_ends(ends: list[int]) -> torch.Tensor:
    """[d_sae] int64: each latent's parents are the latents before its own group (group 0: none)."""
    out = torch.empty(ends[-1], dtype=torch.int64)
    for start, end in group_ranges(ends):
        out[start:end] = start
    return out


def matryoshka_edges(acts, ends: list[int], threshold: float = THRESHOLD, device=None,
                     on_chunk: Callable[[int], None] | None = None, **kw) -> Edges:
    """One Matryoshka SAE's levels: latents of group g + 1 link to latents of groups <= g, on the same
    activations (`ends`: the prefixes' exclusive ends, the last one d_sae)."""
    code = as_code(acts)
    if not ends or ends[-1] != code.d_sae or any(e <= s for s, e in group_ranges(ends)):
        raise ValueError(f"prefix ends must rise strictly to d_sae={code.d_sae}, got {ends}")
    return tree_edges(code, code, threshold, prefix_parent_ends(ends), device=device, on_chunk=on_chunk, **kw)


def parent_recovery(best_parent_S: torch.Tensor, feature_of_child_S: torch.Tensor, latent_of_feature_F: torch.Tensor,
                    parent_F: torch.Tensor, parent_end_S: torch.Tensor | None = None) -> dict:
    """How many children's best parent is their true parent, on a toy model with known features.

    feature_of_child_S [S_b]: the true feature each child latent recovers (-1: none); latent_of_feature_F [F]: the
    parent SAE's latent recovering each feature (-1: none); parent_F [F]: each feature's true parent (-1: root).
    A child counts when its feature has a true parent that the parents recover (and may link to: below
    parent_end_S) while its own feature is not among them (else its best parent should be that same feature,
    counted apart as `same_feature`). Returns children, true_parent (hits), fraction, same_feature, same_feature_hits."""
    best, feat = best_parent_S.long().cpu(), feature_of_child_S.long().cpu()
    lat, parents = latent_of_feature_F.long().cpu(), parent_F.long().cpu()
    S = len(best)
    limit = torch.full((S,), 1 << 62, dtype=torch.int64) if parent_end_S is None else parent_end_S.long().cpu()
    has = feat >= 0
    f = feat.clamp(min=0)
    p = torch.where(has, parents[f], -1)
    parent_latent = torch.where(p >= 0, lat[p.clamp(min=0)], -1)
    own_latent = torch.where(has, lat[f], -1)
    own_allowed = (own_latent >= 0) & (own_latent < limit)
    eligible = (parent_latent >= 0) & (parent_latent < limit) & ~own_allowed
    hits = eligible & (best == parent_latent)
    same = has & own_allowed
    n, h = int(eligible.sum()), int(hits.sum())
    return {"children": n, "true_parent": h, "fraction": h / n if n else None, "same_feature": int(same.sum()),
            "same_feature_hits": int((same & (best == own_latent)).sum())}
