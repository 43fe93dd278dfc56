"""Sparse probing: how well do a few SAE latents predict a label, next to a probe on the raw activations?

For each label (one-vs-rest) on labelled held-out examples, as in Gao et al. 2024 and Kantamneni et al.
2025 (and SAEBench's sparse probing):

- one vector per example: its selected tokens' SAE codes and raw activations, mean-pooled (`pool_rows`);
- a stratified split of the examples into disjoint probe-training and test rows (`split_rows`);
- latents ranked by the difference of class means on the training rows, positives minus negatives
  (signed: SAE codes are non-negative, so the top latents are the ones that fire *for* the label);
- a logistic probe on the top k latents (k = 1, 2, 5), and one on the d_in raw features, fitted on the
  training rows and scored on the test rows.

The probe is an L2 logistic regression (C = 1) on features standardised with the training rows' mean
and std, with balanced class weights: the objective of scikit-learn's LogisticRegression(C=1,
class_weight="balanced"), fitted here by Newton's method in torch, all labels of one k in one batched
fit, so that saex needs no scikit-learn and the demo's 40 probes take about a second (checked once
against scikit-learn 1.9: the same test scores on 40 probes). Balanced weights because one-vs-rest over
10 classes is 90 % negatives, and an unweighted probe may learn to say "no" always. The headline score
is balanced accuracy (chance 0.5); accuracy is reported beside the majority baseline (the test rows'
share of the larger class), so that nobody reads 0.9 as good. Selecting all d latents is exactly the
full probe on the SAE code.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.stats import rankdata

from saex.threads import torch_threads

KS = (1, 2, 5)
POOLING = "mean"
TRAIN_FRAC = 0.5
MIN_POSITIVES = 2  # per label, in each of the training and test rows; fewer and the label is skipped
C_REG = 1.0  # inverse L2 strength, as scikit-learn's C
MAX_ITER = 100  # Newton steps; a handful suffice
MAX_LABELS = 32  # the most frequent labels are probed (ImageNet's 1,000 would cost 1,000 raw probes)
CHUNK = 2**25  # float64 numbers of features per group of labels fitted at once (256 MiB)
PROBE = "logistic regression (L2, C=1, balanced class weights, torch Newton fit) on standardised features"
SELECTION = "mean_diff"  # mean over positive training rows minus mean over negative ones, largest first


def pool_rows(x_TD: torch.Tensor, rows_T: torch.Tensor, n: int) -> torch.Tensor:
    """[n, D] float32: the mean of x's rows per example (rows_T: each row's example, 0..n-1); 0 for an
    example without rows."""
    out = torch.zeros(n, x_TD.shape[1], dtype=torch.float32, device=x_TD.device)
    out.index_add_(0, rows_T, x_TD.float())
    return out / counts(rows_T, n).clamp(min=1)[:, None]


def pool_code(values_TK: torch.Tensor, indices_TK: torch.Tensor, rows_T: torch.Tensor, n: int,
              d_sae: int) -> torch.Tensor:
    """[n, d_sae] float32: the mean SAE code per example, from the top-k form (no dense [T, d_sae])."""
    out = torch.zeros(n, d_sae, dtype=torch.float32, device=values_TK.device)
    out.index_put_((rows_T[:, None].expand_as(indices_TK), indices_TK), values_TK.float(), accumulate=True)
    return out / counts(rows_T, n).clamp(min=1)[:, None]


class ProbeRows:
    """What eval collects for probing, batch by batch: per SAE, each example's pooled code (sparse: a wide
    SAE's dense codes of every example would not fit) and pooled raw activations (on the CPU), and the
    examples' labels; examples without selected tokens are dropped."""

    def __init__(self):
        self.codes, self.raw, self.labels, self.has_rows = {}, {}, [], []

    def add_batch(self, mask_BT: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Record a batch's labels; returns rows_T, the example of each selected token (row-major, like
        x[mask_BT])."""
        rows_T = mask_BT.nonzero()[:, 0]
        self.labels.append(labels_B.cpu())
        self.has_rows.append(counts(rows_T, len(labels_B)).cpu() > 0)
        return rows_T

    def add(self, name: str, code, x_TD: torch.Tensor, rows_T: torch.Tensor) -> None:
        n = len(self.labels[-1])
        pooled = pool_code(code.values_BK, code.indices_BK, rows_T, n, code.d_sae)
        self.codes.setdefault(name, []).append(pooled.cpu().to_sparse())
        self.raw.setdefault(name, []).append(pool_rows(x_TD, rows_T, n).cpu())

    def result(self, name: str, label_names=None) -> dict | None:
        if name not in self.codes:
            return None
        keep = torch.cat(self.has_rows).nonzero()[:, 0]
        return probing(torch.cat(self.codes[name]).index_select(0, keep), torch.cat(self.raw[name])[keep],
                       torch.cat(self.labels)[keep].numpy(), label_names)


def counts(rows_T: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(rows_T, minlength=n).float()


def split_rows(labels_N: np.ndarray, train_frac: float = TRAIN_FRAC, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, test) row indices, sorted; stratified: each label's rows are shuffled and its
    first train_frac * n (rounded half up) go to training."""
    if not 0 < train_frac < 1:
        raise ValueError(f"train_frac={train_frac} must be between 0 and 1 (exclusive)")
    rng = np.random.default_rng(seed)
    train = []
    for c in np.unique(labels_N):
        rows = rng.permutation(np.flatnonzero(labels_N == c))
        train.append(rows[: int(np.floor(train_frac * len(rows) + 0.5))])
    train_N = np.sort(np.concatenate(train)) if train else np.zeros(0, dtype=np.int64)
    test_N = np.setdiff1d(np.arange(len(labels_N)), train_N)
    return train_N, test_N


def rank_latents(codes_NS: torch.Tensor, y_NL: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per label (columns of y, 0/1): (latents in decreasing order of mean difference [L, S], the
    differences [L, S]); ties by latent index. codes may be a sparse tensor."""
    y_NL = y_NL.double()
    sums_SL = codes_NS.t() @ y_NL  # sum over each label's positives (sparse @ dense is dense)
    total_S = codes_NS.t() @ torch.ones(len(y_NL), 1, dtype=torch.float64)
    n_pos = y_NL.sum(0)
    diff_LS = (sums_SL / n_pos - (total_S - sums_SL) / (len(y_NL) - n_pos)).T.numpy()
    return np.argsort(-diff_LS, axis=1, kind="stable"), diff_LS


def columns(codes_NS: torch.Tensor, latents: np.ndarray) -> torch.Tensor:
    """[N, k] dense float64: the codes of these latents."""
    picked = codes_NS.index_select(1, torch.as_tensor(latents, dtype=torch.int64))
    return (picked.to_dense() if picked.is_sparse else picked).double()


def logistic_fit(X_LNF: torch.Tensor, y_LN: torch.Tensor, C: float = C_REG, max_iter: int = MAX_ITER,
                 tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """L independent L2 logistic regressions at once, by damped Newton steps in float64.

    Each minimises 0.5 ||w||^2 + C sum_i s_i log(1 + exp(-t_i (x_i . w + b))) (t_i = +-1; the intercept b
    unpenalised; s_i = N / (2 N_class): balanced class weights), the objective of scikit-learn's
    LogisticRegression(C, class_weight="balanced"). It is strictly convex, so Newton's method with
    halving steps finds its minimum in a few steps. Returns (theta [L, F + 1] with b last, converged [L])."""
    # one thread: these small ops gain little from two, and lose 5x when another process shares the
    # cores (saex.threads): 1.2 s against 5.9 s on data of the demo's shape beside busy processes
    with torch_threads(1):
        return _newton(X_LNF.double(), y_LN.double(), C, max_iter, tol)


def _newton(X_LNF, y_LN, C, max_iter, tol):
    L, N, F = X_LNF.shape
    Z_LNF = torch.cat([X_LNF, X_LNF.new_ones(L, N, 1)], -1)
    n_pos = y_LN.sum(1, keepdim=True)
    s_LN = torch.where(y_LN > 0, N / (2 * n_pos), N / (2 * (N - n_pos)))
    t_LN = 2 * y_LN - 1
    penalty = torch.ones(F + 1, dtype=torch.float64)
    penalty[-1] = 0.0

    def objective(z_LN, theta_LF):  # at logits z = Z theta; leading dimensions broadcast
        return C * (s_LN * torch.logaddexp(torch.zeros_like(z_LN), -t_LN * z_LN)).sum(-1) + \
            0.5 * (penalty * theta_LF ** 2).sum(-1)

    theta = torch.zeros(L, F + 1, dtype=torch.float64)
    done = torch.zeros(L, dtype=torch.bool)
    halvings = 0.5 ** torch.arange(30, dtype=torch.float64)
    for _ in range(max_iter):
        z_LN = (Z_LNF @ theta[..., None])[..., 0]
        p_LN = torch.sigmoid(z_LN)
        grad = C * (Z_LNF.transpose(1, 2) @ (s_LN * (p_LN - y_LN))[..., None])[..., 0] + penalty * theta
        H = C * Z_LNF.transpose(1, 2) @ (Z_LNF * (s_LN * p_LN * (1 - p_LN))[..., None]) + torch.diag(penalty)
        H = H + 1e-9 * torch.eye(F + 1, dtype=torch.float64)
        bad = ~(torch.isfinite(H).all((1, 2)) & torch.isfinite(grad).all(1))
        H[bad], grad[bad] = torch.eye(F + 1, dtype=torch.float64), 0.0  # a label whose fit broke stops here
        step, info = torch.linalg.solve_ex(H, grad)
        singular = info != 0  # (near-)singular H: a gradient step scaled by its diagonal instead
        step[singular] = grad[singular] / H[singular].diagonal(dim1=1, dim2=2).clamp_min(1e-9)
        step[done | bad] = 0
        # the objective along the step at the step sizes `halvings` (logits are linear in the step size):
        # the full step first, and all of them only when the full step fails to descend for some label
        dz_LN = (Z_LNF @ step[..., None])[..., 0]
        f0 = objective(z_LN, theta)
        ok = (objective(z_LN - dz_LN, theta - step) <= f0)[:, None]
        if not ok.all():
            a_A = halvings[:, None, None]
            ok = (objective(z_LN - a_A * dz_LN, theta - a_A * step) <= f0).T  # [L, A]
        first = torch.where(ok.any(1), ok.float().argmax(1), len(halvings) - 1)
        theta = theta - halvings[first][:, None] * step
        done |= (halvings[first][:, None] * step).abs().amax(1) < tol * (1 + theta.abs().amax(1))
        if done.all():
            break
    return theta, done


def scores(score_M: torch.Tensor, y_M: torch.Tensor) -> dict:
    """Accuracy, balanced accuracy (mean of the two classes' recalls) and AUROC (Mann-Whitney, ties
    count one half) of a probe's scores, thresholded at 0."""
    y = y_M.bool()
    pred = score_M > 0
    ranks = torch.from_numpy(rankdata(score_M.numpy()))  # average ranks of ties
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    auroc = (float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"accuracy": float((pred == y).double().mean()),
            "balanced_accuracy": 0.5 * (float(pred[y].double().mean()) + float((~pred[~y]).double().mean())),
            "auroc": auroc}


def fit_probes(X_train_LNF: torch.Tensor, y_train_LN: torch.Tensor, X_test_LMF: torch.Tensor,
               y_test_LM: torch.Tensor) -> list[dict]:
    """L logistic probes, each on features standardised with its training rows' mean and std (a
    constant feature stays 0), fitted on the training rows and scored on the test rows; in groups of
    labels that keep each group's features under CHUNK numbers."""
    L, N, F = X_train_LNF.shape
    step = max(1, CHUNK // (N * (min(F, N) + 1)))
    out = []
    for i in range(0, L, step):
        part = slice(i, i + step)
        out += _fit_probes(X_train_LNF[part].double(), y_train_LN[part], X_test_LMF[part].double(), y_test_LM[part])
    return out


def _fit_probes(X_train_LNF, y_train_LN, X_test_LMF, y_test_LM) -> list[dict]:
    mean = X_train_LNF.mean(1, keepdim=True)
    std = X_train_LNF.std(1, unbiased=False, keepdim=True)
    std = torch.where(std > 1e-8 * (mean.abs() + 1), std, torch.ones_like(std))  # constant features stay 0
    X_train_LNF, X_test_LMF = (X_train_LNF - mean) / std, (X_test_LMF - mean) / std
    if X_train_LNF.shape[2] > X_train_LNF.shape[1]:
        # more features than rows: the optimal weights are a combination of the training rows (the
        # penalty's gradient w must cancel the loss's, which is one), so the probe on the coordinates
        # in an orthonormal basis Q of a space holding their span (X^T = QR) is the same probe:
        # x . w = (x Q) . beta with ||w|| = ||beta||. The raw probes of all labels share one X.
        shared = all(torch.equal(X_train_LNF[0], x) for x in X_train_LNF[1:])
        Q_LFN = torch.linalg.qr((X_train_LNF[:1] if shared else X_train_LNF).transpose(1, 2)).Q
        X_train_LNF, X_test_LMF = X_train_LNF @ Q_LFN, X_test_LMF @ Q_LFN
    theta, converged = logistic_fit(X_train_LNF, y_train_LN)
    score_LM = (X_test_LMF @ theta[:, :-1, None])[..., 0] + theta[:, -1:]
    return [{**scores(score_LM[i], y_test_LM[i]), "converged": bool(converged[i])} for i in range(len(theta))]


def sparse_probe(codes_NS: np.ndarray, y_N: np.ndarray, train_N: np.ndarray, test_N: np.ndarray, k: int,
                 order: np.ndarray | None = None) -> dict:
    """The probe on the k latents with the largest mean difference on the training rows (`order`, from
    rank_latents on them; fitted in latent order, so k = d_sae is the full probe on the code)."""
    codes_NS, y = _tensor(codes_NS), torch.as_tensor(y_N, dtype=torch.float64)
    if order is None:
        order = rank_latents(codes_NS.index_select(0, torch.as_tensor(train_N)), y[train_N, None])[0][0]
    X = columns(codes_NS, np.sort(order[:k]))
    fit = fit_probes(X[train_N][None], y[train_N][None], X[test_N][None], y[test_N][None])[0]
    return {"latents": order[:k].tolist(), **fit}


def probing(codes_NS: torch.Tensor | np.ndarray, raw_ND: torch.Tensor | np.ndarray, labels_N, label_names=None,
            ks=KS, train_frac: float = TRAIN_FRAC, seed: int = 0) -> dict | None:
    """Sparse probes per label and k against raw-activation probes (names in docs/formats.md, `probing`);
    None when fewer than two labels have MIN_POSITIVES rows in both parts."""
    start = time.perf_counter()
    codes_NS, raw_ND = _tensor(codes_NS), _tensor(raw_ND)
    labels_N = np.asarray(labels_N).astype(np.int64)
    if not (len(codes_NS) == len(raw_ND) == len(labels_N)):
        raise ValueError(f"codes ({len(codes_NS)}), raw activations ({len(raw_ND)}) and labels ({len(labels_N)}) "
                         "must have one row per example")
    keep = np.flatnonzero(labels_N >= 0)
    codes_NS, raw_ND, labels_N = codes_NS.index_select(0, torch.as_tensor(keep)), raw_ND[keep], labels_N[keep]
    train_N, test_N = split_rows(labels_N, train_frac, seed)
    probed, skipped, unprobed = [], [], 0
    present, n_C = np.unique(labels_N, return_counts=True)
    for c in present[np.argsort(-n_C, kind="stable")].tolist():  # most frequent first
        y_N = labels_N == c
        pos_train, pos_test = int(y_N[train_N].sum()), int(y_N[test_N].sum())
        if min(pos_train, pos_test, len(train_N) - pos_train, len(test_N) - pos_test) < MIN_POSITIVES:
            skipped.append(_name(c, label_names))
        elif len(probed) < MAX_LABELS:
            probed.append(c)
        else:
            unprobed += 1
    probed.sort()
    if len(probed) < 2:
        return None
    y_LN = torch.as_tensor(np.stack([labels_N == c for c in probed]), dtype=torch.float64)
    order_LS, diff_LS = rank_latents(codes_NS.index_select(0, torch.as_tensor(train_N)), y_LN[:, train_N].T)
    ks = [int(k) for k in ks if k <= codes_NS.shape[1]]
    sae = {}
    used = np.unique(order_LS[:, :max(ks, default=0)])  # densify only the latents some probe reads
    dense_NU = columns(codes_NS, used)
    for k in ks:  # one batched fit of every label's probe on its own top k latents
        X_LNk = torch.stack([dense_NU[:, np.searchsorted(used, np.sort(order[:k]))] for order in order_LS])
        sae[k] = fit_probes(X_LNk[:, train_N], y_LN[:, train_N], X_LNk[:, test_N], y_LN[:, test_N])
    raw_LND = raw_ND.expand(len(probed), -1, -1)
    raw = fit_probes(raw_LND[:, train_N], y_LN[:, train_N], raw_LND[:, test_N], y_LN[:, test_N])
    rows = []
    for i, (c, order, diff_S) in enumerate(zip(probed, order_LS, diff_LS)):
        pos_test = int(y_LN[i, test_N].sum())
        rows.append({"label": c, "name": _name(c, label_names), "positives_train": int(y_LN[i, train_N].sum()),
                     "positives_test": pos_test, "majority": max(pos_test, len(test_N) - pos_test) / len(test_N),
                     "best_latent": int(order[0]), "best_latent_mean_diff": float(diff_S[order[0]]),
                     "sae": {str(k): {"latents": order[:k].tolist(), **sae[k][i]} for k in ks}, "raw": raw[i]})
    return {"pooling": POOLING, "selection": SELECTION, "probe": PROBE, "ks": [int(k) for k in ks], "d_in": raw_ND.shape[1],
            "train_examples": len(train_N), "test_examples": len(test_N), "labels": rows, "skipped_labels": skipped,
            "unprobed_labels": unprobed,
            "summary": _summary(rows, ks), "seconds": round(time.perf_counter() - start, 3)}


SCORES = ("accuracy", "balanced_accuracy", "auroc")


def _summary(rows: list[dict], ks) -> dict:
    """Means over the probed labels: per k for the SAE probe, and for the raw probe and the majority baseline."""
    mean = lambda probes: {s: float(np.mean([p[s] for p in probes])) for s in SCORES}  # noqa: E731
    return {"labels": len(rows), "majority": float(np.mean([r["majority"] for r in rows])),
            "sae": {str(k): mean([r["sae"][str(k)] for r in rows]) for k in ks if str(k) in rows[0]["sae"]},
            "raw": mean([r["raw"] for r in rows]),
            "unconverged": sum(not p["converged"] for r in rows for p in [r["raw"], *r["sae"].values()])}


def _name(c: int, label_names) -> str:
    return label_names[c] if label_names and c < len(label_names) else str(c)


def _tensor(x) -> torch.Tensor:
    """float64 on the CPU; a sparse tensor stays sparse (coalesced)."""
    x = torch.as_tensor(x).detach().cpu().double()
    return x.coalesce() if x.is_sparse else x


def summary_line(result: dict) -> str:
    """One line for the eval table: mean balanced accuracy per k against the raw probe."""
    s = result["summary"]
    ks = " ".join(f"k={k} {v['balanced_accuracy']:.3f}" for k, v in s["sae"].items())
    return (f"probing ({s['labels']} labels, balanced acc.): SAE {ks} | raw {s['raw']['balanced_accuracy']:.3f}"
            f" (accuracy: SAE k={max(s['sae'], key=int)} {s['sae'][max(s['sae'], key=int)]['accuracy']:.3f},"
            f" raw {s['raw']['accuracy']:.3f}, majority {s['majority']:.3f})")
