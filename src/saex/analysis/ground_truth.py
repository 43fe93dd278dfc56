"""Ground-truth recovery on toy data (seeds 003, 004): how well an SAE's latents recover known features.

Inputs are tensors: the SAE's decoder W_dec [S, d] and its codes on held-out rows (dense [N, S] or a
saex.sae.code.Code), the true features [F, d], the true codes of the same rows (indices_NK int64, -1
pads; values_NK), parent_F int64 [F] (-1 for a root), the rows x [N, d] and their reconstruction x_hat.

Names (metrics.json), with cos(s, f) the cosine of decoder row s and true feature f:
  gt_matching             "hungarian" (scipy.optimize.linear_sum_assignment), how latents were matched
  gt_mcc                  mean over the F true features of |cos(match(f), f)|, one-to-one matching that
                          maximises the sum of |cos|; a feature left unmatched (S < F) counts 0
  gt_mmcs                 mean over true features of max_s |cos(s, f)| (no matching: latents may repeat)
  gt_f1, gt_precision, gt_recall
                          per true feature, "its matched latent fires (value > 0)" as a detector of "the
                          feature is active" over the rows; means over the features where each is defined
                          (precision needs a firing, recall an active row, F1 either); unmatched: never fires
  gt_unique_frac          each latent claims its best feature (max |cos|) when that |cos| >= CLAIM_COS;
                          the fraction of true features claimed by exactly one latent
  gt_claimed_frac         the fraction of true features claimed by at least one latent
  gt_latents_per_feature  the mean number of claiming latents over the claimed features (1 = unique)
  gt_shrinkage            mean over rows (||x|| > 0) of ||x_hat|| / ||x||
  gt_bias                 the relative reconstruction bias of Rajamanoharan et al. 2024 (Gated SAEs):
                          gamma = argmin_g sum ||x_hat / g - x||^2 = sum ||x_hat||^2 / sum <x_hat, x>
                          (1 = unbiased, < 1 shrinks; the reciprocal of argmin_g sum ||g x_hat - x||^2)
  gt_absorption           mean over (parent p, child c) pairs with both matched and the child active on
                          some row of gt_absorption_pairs' absorbed_frac; null when there is no such pair
  gt_absorption_pairs     per pair: parent, child, their latents, child_rows (rows where c is active),
                          parent_cos (cos of the child's latent with the parent feature, oriented by the
                          sign of its matched cosine), absorbed_frac: over the child rows, the fraction
                          where the parent's latent does not fire while the child's fires, counted only
                          when parent_cos > ABSORB_COS (otherwise 0: the child latent holds no parent part)
  gt_features, gt_pairs   F and the number of pairs counted in gt_absorption
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CLAIM_COS = 0.5
ABSORB_COS = 0.1


def cosines(W_dec_SD: torch.Tensor, features_FD: torch.Tensor) -> torch.Tensor:
    """[S, F] cosine of each decoder row with each true feature (float64, on the CPU)."""
    W = torch.nn.functional.normalize(W_dec_SD.detach().double().cpu(), dim=1)
    T = torch.nn.functional.normalize(features_FD.detach().double().cpu(), dim=1)
    return W @ T.T


def match(cos_SF: torch.Tensor) -> tuple[np.ndarray, str]:
    """(latent_F, method): the latent matched to each true feature (-1: none), one-to-one, maximising
    the sum of |cos| (the Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    a = cos_SF.abs().numpy()
    latent_F = np.full(a.shape[1], -1, dtype=np.int64)
    rows, cols = linear_sum_assignment(-a)
    latent_F[cols] = rows
    return latent_F, "hungarian"


def true_active(indices_NK: torch.Tensor, values_NK: torch.Tensor, n_features: int) -> torch.Tensor:
    """bool [N, F]: which true features are active on each row (index >= 0 and value != 0)."""
    keep = (indices_NK >= 0) & (values_NK != 0)
    out = torch.zeros(indices_NK.shape[0], n_features + 1, dtype=torch.bool)
    idx = torch.where(keep, indices_NK, n_features).long().cpu()
    out.scatter_(1, idx, True)
    return out[:, :n_features]


def fires_of(code, latent_F: np.ndarray) -> torch.Tensor:
    """bool [N, F]: whether the latent matched to each feature fires (> 0); False where unmatched.
    code: dense [N, S] or a Code (values_BK, indices_BK)."""
    lat = torch.as_tensor(latent_F)
    if isinstance(code, torch.Tensor):
        f = code.detach().cpu()
        out = f[:, lat.clamp(min=0)] > 0
    else:
        vals, idx = code.values_BK.detach().cpu(), code.indices_BK.detach().cpu()
        fired = torch.zeros(vals.shape[0], code.d_sae + 1, dtype=torch.bool)
        fired.scatter_(1, torch.where(vals > 0, idx, code.d_sae).long(), True)
        out = fired[:, lat.clamp(min=0)]
    return out & (lat >= 0)


def _nanmean(a: np.ndarray) -> float | None:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else None


def detection(active_NF: torch.Tensor, fires_NF: torch.Tensor) -> dict:
    """Mean precision, recall and F1 of fires as a detector of active, per feature (see the names)."""
    tp = (active_NF & fires_NF).sum(0).double().numpy()
    fp = (~active_NF & fires_NF).sum(0).double().numpy()
    fn = (active_NF & ~fires_NF).sum(0).double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall, f1 = tp / (tp + fp), tp / (tp + fn), 2 * tp / (2 * tp + fp + fn)
    return {"gt_f1": _nanmean(f1), "gt_precision": _nanmean(precision), "gt_recall": _nanmean(recall)}


def uniqueness(cos_SF: torch.Tensor, claim_cos: float = CLAIM_COS) -> dict:
    best, feature_S = cos_SF.abs().max(1)
    claims_F = torch.bincount(feature_S[best >= claim_cos], minlength=cos_SF.shape[1])
    claimed = claims_F > 0
    return {"gt_unique_frac": float((claims_F == 1).double().mean()),
            "gt_claimed_frac": float(claimed.double().mean()),
            "gt_latents_per_feature": float(claims_F[claimed].double().mean()) if claimed.any() else None}


def shrinkage(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> dict:
    x, x_hat = x_ND.detach().double().cpu(), x_hat_ND.detach().double().cpu()
    norm = x.norm(dim=1)
    ok = norm > 0
    dot = float((x_hat * x).sum())
    return {"gt_shrinkage": float((x_hat.norm(dim=1)[ok] / norm[ok]).mean()) if ok.any() else None,
            "gt_bias": float(x_hat.pow(2).sum()) / dot if dot != 0 else None}


def absorption(cos_SF: torch.Tensor, latent_F: np.ndarray, parent_F: torch.Tensor, active_NF: torch.Tensor,
               fires_NF: torch.Tensor, absorb_cos: float = ABSORB_COS) -> dict:
    """Per (parent, child) pair: how often the child's latent takes over the parent's (see the names)."""
    pairs = []
    for c, p in enumerate(parent_F.tolist()):
        if p < 0 or latent_F[c] < 0 or latent_F[p] < 0:
            continue
        rows = active_NF[:, c]
        n = int(rows.sum())
        if not n:
            continue
        lc = int(latent_F[c])
        parent_cos = float(cos_SF[lc, p] * torch.sign(cos_SF[lc, c]))
        absorbed = rows & ~fires_NF[:, p] & fires_NF[:, c]
        frac = float(absorbed.sum()) / n if parent_cos > absorb_cos else 0.0
        pairs.append({"parent": p, "child": c, "parent_latent": int(latent_F[p]), "child_latent": lc,
                      "child_rows": n, "parent_cos": parent_cos, "absorbed_frac": frac})
    return {"gt_absorption": float(np.mean([q["absorbed_frac"] for q in pairs])) if pairs else None,
            "gt_pairs": len(pairs), "gt_absorption_pairs": pairs}


def ground_truth_metrics(W_dec_SD: torch.Tensor, code, features_FD: torch.Tensor, indices_NK: torch.Tensor,
                         values_NK: torch.Tensor, parent_F: torch.Tensor, x_ND: torch.Tensor,
                         x_hat_ND: torch.Tensor, claim_cos: float = CLAIM_COS,
                         absorb_cos: float = ABSORB_COS) -> dict:
    """Every gt_* metric of the module docstring, as one JSON-ready dict."""
    cos_SF = cosines(W_dec_SD, features_FD)
    latent_F, method = match(cos_SF)
    F = cos_SF.shape[1]
    matched = torch.as_tensor(latent_F) >= 0
    matched_cos = torch.zeros(F, dtype=torch.float64)
    matched_cos[matched] = cos_SF[torch.as_tensor(latent_F)[matched], torch.arange(F)[matched]].abs()
    active_NF = true_active(indices_NK.cpu(), values_NK.cpu(), F)
    fires_NF = fires_of(code, latent_F)
    return {"gt_matching": method, "gt_features": F, "gt_mcc": float(matched_cos.mean()),
            "gt_mmcs": float(cos_SF.abs().max(0).values.mean()),
            **detection(active_NF, fires_NF), **uniqueness(cos_SF, claim_cos), **shrinkage(x_ND, x_hat_ND),
            **absorption(cos_SF, latent_F, torch.as_tensor(parent_F).cpu(), active_NF, fires_NF, absorb_cos)}


def hierarchy_order(parent_F: torch.Tensor) -> list[int]:
    """True features depth first from the roots (in index order): each parent followed by its children.
    A feature on a parent cycle (never reached from a root) comes last, in index order."""
    parents = torch.as_tensor(parent_F).tolist()
    children: dict[int, list[int]] = {}
    for c, p in enumerate(parents):
        children.setdefault(p, []).append(c)
    order, seen = [], set()
    stack = list(reversed(children.get(-1, [])))
    while stack:
        f = stack.pop()
        if f in seen:
            continue
        seen.add(f)
        order.append(f)
        stack.extend(reversed(children.get(f, [])))
    return order + [f for f in range(len(parents)) if f not in seen]


def heat_map(W_dec_SD: torch.Tensor, features_FD: torch.Tensor, parent_F: torch.Tensor,
             max_latents: int | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
    """(cos [F, S'], feature order, latent order): signed cosines with the true features in hierarchy order
    and the latents in the order of their matched features, then the unmatched latents by the position
    of their best feature (and |cos|), cut to max_latents."""
    cos_SF = cosines(W_dec_SD, features_FD)
    latent_F, _ = match(cos_SF)
    features = hierarchy_order(parent_F)
    pos = {f: i for i, f in enumerate(features)}
    latents = [int(latent_F[f]) for f in features if latent_F[f] >= 0]
    taken = set(latents)
    best, best_f = cos_SF.abs().max(1)
    rest = sorted((s for s in range(cos_SF.shape[0]) if s not in taken),
                  key=lambda s: (pos[int(best_f[s])], -float(best[s])))
    latents = (latents + rest)[:max_latents]
    return cos_SF[latents][:, features].T.contiguous(), features, latents


def heat_map_png(W_dec_SD: torch.Tensor, features_FD: torch.Tensor, parent_F: torch.Tensor, path: Path,
                 title: str = "", max_latents: int = 512) -> Path:
    """Draw heat_map (matplotlib, Agg) to path (a PNG): features down, latents across, red +1, blue -1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cos, features, latents = heat_map(W_dec_SD, features_FD, parent_F, max_latents)
    F, S = cos.shape
    fig, ax = plt.subplots(figsize=(min(4 + S * 0.12, 24), min(3 + F * 0.12, 18)), dpi=100)
    im = ax.imshow(cos.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    if F <= 64:
        ax.set_yticks(range(F), [str(f) for f in features], fontsize=6)
    if S <= 64:
        ax.set_xticks(range(S), [str(s) for s in latents], fontsize=6, rotation=90)
    ax.set_ylabel("true feature (parents followed by their children)")
    ax.set_xlabel("latent (ordered by matched feature)")
    ax.set_title(title or "cosine of decoder rows with true features")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
