"""The toy stage: fills RUN/acts/ with synthetic activations whose true features are known (seeds 003, 004).

Another way to fill the activation store beside harvest.py: the store has the ordinary format (one hook,
`toy`), so train, eval and index read it unchanged, and RUN/acts/true_features.safetensors holds the truth.

The generative model (docs/toy.md):
- directions: F unit vectors in R^d, a mix of random Gaussian directions (weight `superposition`) and the
  same directions made as orthogonal as they can be (exactly orthogonal when F <= d);
- firing: feature i has an own probability q_i = s * (i+1)^-exponent (capped at 1), with s chosen so the
  mean number of active features per row is `l0`. Features outside the hierarchy and the roots of its
  trees fire through a low-rank Gaussian copula (marginals q_i exactly, latent correlations from
  `correlation_rank` shared factors carrying a `correlation` share of each latent's variance). When a
  parent fires, at most one of its children fires (children exclusive): child c with probability
  min(m_p, S) / m_p * q_c / S, where m_p is the parent's marginal and S its children's summed q; so a
  child's marginal is q_c wherever its parent is frequent enough, and less where it is not;
- magnitudes: |N(magnitude_mean, magnitude_std)| per active feature; x = sum_i value_i * feature_i + noise.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from saex import config as configs
from saex.locks import exclusive
from saex.runlog import JsonlLog, progress
from saex.store import StoreWriter, acts_column, load_manifest
from saex.store.files import atomic_save_tensors

HOOK = "toy"
TRUE_FEATURES = "true_features.safetensors"
CHUNK_ROWS = 4096  # rows sampled at once: bounds the [rows, F] firing matrix (4096 x 16384 floats = 256 MB)


@dataclass
class ToyConfig:
    run: str
    """Run folder; the activations go to RUN/acts/, the true features to RUN/acts/true_features.safetensors."""
    preset: Literal["small", "synthsaebench-16k"] = "small"
    """Fills the options below that are left unset: small (256 features in 64 dimensions, trains in a minute on
    2 CPU cores) or synthsaebench-16k (the shape of SAELens' SynthSAEBench-16k; see docs/toy.md)."""
    n_features: int | None = None
    """Number of true features F."""
    d: int | None = None
    """Width of the activations."""
    rows: int | None = None
    """Rows to write (one example per row)."""
    frequency_exponent: float | None = None
    """Power law of the features' own firing probabilities: q_i proportional to (i+1)^-exponent (0: all equal)."""
    l0: float | None = None
    """Mean number of true features active per row (the power law is scaled to give it)."""
    magnitude_mean: float | None = None
    """Mean of an active feature's magnitude, drawn as |N(mean, std)|."""
    magnitude_std: float | None = None
    """Std of an active feature's magnitude before folding (|N(mean, std)|)."""
    correlation: float | None = None
    """Share (0 to <1) of each firing latent's variance from shared low-rank factors (a Gaussian copula over the
    firing decisions of roots and features outside the hierarchy); 0: independent."""
    correlation_rank: int | None = None
    """Number of shared factors of the correlation."""
    hierarchy_fraction: float | None = None
    """Share of the features placed in trees (parents and children); the rest fire on their own."""
    children_per_parent: int | None = None
    """Children of each parent in the trees."""
    hierarchy_depth: int | None = None
    """Levels of children below each root (1: roots and their children only)."""
    superposition: float | None = None
    """0 to 1: weight of random Gaussian directions against maximally orthogonal ones (0: orthogonal, exactly
    when n_features <= d; 1: independent random unit vectors)."""
    noise: float | None = None
    """Std of isotropic Gaussian noise added to every coordinate of x."""
    alone: bool = False
    """Features outside the hierarchy and roots fire alone: at most one per row, feature i with probability q_i
    (their q must sum to at most 1, so l0 <= 1 without a hierarchy; needs correlation 0)."""
    seed: int = 0
    """Seed of the toy model and of its rows (shard i's rows come from a generator seeded by seed and i)."""
    shard_rows: int = 65536
    """Rows per shard; a resumed toy stage must use the same."""
    overwrite: bool = False
    """Replace activations already in the run folder."""


PRESETS = {
    "small": dict(n_features=256, d=64, rows=200_000, frequency_exponent=0.5, l0=5.0, magnitude_mean=1.0,
                  magnitude_std=0.25, correlation=0.1, correlation_rank=8, hierarchy_fraction=0.25,
                  children_per_parent=4, hierarchy_depth=1, superposition=1.0, noise=0.01),
    # SynthSAEBench-16k: 16,384 features, d 768, Zipf exponent 0.5, L0 ~34, 128 roots with 4 children over 3
    # levels (128 x 85 = 10,880 features: 0.6640625 of them), low-rank correlation (rank 25, factor entries of
    # std 0.1: a 25 x 0.1^2 = 0.25 variance share), random directions (rho_mm ~0.15). Our simplifications: one
    # magnitude distribution (mean 4.5, the middle of its 5 -> 4 ramp; std 0.5), noise 0 (not described), and
    # 2M rows (3 GB of bf16) rather than the 200M samples it streams.
    "synthsaebench-16k": dict(n_features=16384, d=768, rows=2_000_000, frequency_exponent=0.5, l0=34.0,
                              magnitude_mean=4.5, magnitude_std=0.5, correlation=0.25, correlation_rank=25,
                              hierarchy_fraction=0.6640625, children_per_parent=4, hierarchy_depth=3,
                              superposition=1.0, noise=0.0),
}


def resolve(cfg: ToyConfig) -> ToyConfig:
    """`cfg` with every unset option taken from its preset, checked."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; valid: {sorted(PRESETS)}")
    values = {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in PRESETS[cfg.preset].items()}
    r = dataclasses.replace(cfg, **values)
    checks = [
        ("n_features", r.n_features >= 1, ">= 1"), ("d", r.d >= 1, ">= 1"), ("rows", r.rows >= 1, ">= 1"),
        ("l0", 0 < r.l0 <= r.n_features, f"in (0, n_features={r.n_features}]"),
        ("frequency_exponent", r.frequency_exponent >= 0, ">= 0"),
        ("magnitude_mean", r.magnitude_mean >= 0, ">= 0"), ("magnitude_std", r.magnitude_std >= 0, ">= 0"),
        ("correlation", 0 <= r.correlation < 1, "in [0, 1)"), ("correlation_rank", r.correlation_rank >= 1, ">= 1"),
        ("hierarchy_fraction", 0 <= r.hierarchy_fraction <= 1, "in [0, 1]"),
        ("children_per_parent", r.children_per_parent >= 1, ">= 1"),
        ("hierarchy_depth", r.hierarchy_depth >= 1, ">= 1"),
        ("superposition", 0 <= r.superposition <= 1, "in [0, 1]"), ("noise", r.noise >= 0, ">= 0"),
        ("shard_rows", r.shard_rows >= 1, ">= 1"),
        ("correlation", not (r.alone and r.correlation > 0), "0 with --alone (features that fire alone are not "
         "correlated)"),
    ]
    for name, ok, valid in checks:
        if not ok:
            raise ValueError(f"{name} must be {valid}, got {getattr(r, name)}")
    return r


@dataclass
class ToyModel:
    features_FD: torch.Tensor
    """float32 [F, d], unit rows."""
    parent_F: torch.Tensor
    """int64 [F], -1 for a root or a feature outside the hierarchy."""
    frequency_F: torch.Tensor
    """float32 [F], marginal firing probability."""
    own_F: torch.Tensor
    """float64 [F]: q_i for copula features; for a child, its probability given that its parent fired."""
    loadings_FR: torch.Tensor
    """float32 [F, R]: the copula's factor loadings (zero rows for children)."""
    magnitude_mean: float
    magnitude_std: float
    noise: float
    alone: bool = False
    """Free features and roots exclude each other (one categorical draw per row) instead of the copula."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features_FD": self.features_FD, "parent_F": self.parent_F, "frequency_F": self.frequency_F,
                "own_F": self.own_F, "loadings_FR": self.loadings_FR}

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_ND float32, indices_NK int64 with -1 padding, values_NK float32): the rows and which true features
        are active with what magnitude (indices ascending in each row)."""
        parts = [self._sample(min(CHUNK_ROWS, n - s), generator) for s in range(0, n, CHUNK_ROWS)]
        if not parts:
            return torch.empty(0, self.features_FD.shape[1]), torch.empty(0, 0, dtype=torch.int64), torch.empty(0, 0)
        k = max(p[1].shape[1] for p in parts)
        pad = [(p[0], torch.nn.functional.pad(p[1], (0, k - p[1].shape[1]), value=-1),
                torch.nn.functional.pad(p[2], (0, k - p[2].shape[1]))) for p in parts]
        return tuple(torch.cat([p[i] for p in pad]) for i in range(3))

    def __post_init__(self):
        # each level of the trees, top first: its parents and their children [P, C] (-1 padded)
        self._tree = [(parents, _children(self.parent_F, parents)) for parents in _levels(self.parent_F)]

    def _fire(self, n: int, g: torch.Generator) -> torch.Tensor:
        F = len(self.parent_F)
        free = self.parent_F < 0
        fired_NF = torch.zeros(n, F, dtype=torch.bool)
        if self.alone:
            fired_NF[:, free] = _categorical(self.own_F[free], n, g)
        else:
            self._copula(fired_NF, free, n, g)
        for parents, children_PC in self._tree:  # top-down: a parent's decision precedes its children's
            cum_PC = torch.where(children_PC >= 0, self.own_F[children_PC.clamp(min=0)], 0.0).cumsum(1).float()
            row, p = torch.nonzero(fired_NF[:, parents], as_tuple=True)  # the parents that fired, row-major
            u = torch.rand(len(row), 1, generator=g)
            pick = (u >= cum_PC[p]).sum(1)  # the first child whose cumulative probability passes u; C: none
            chosen = children_PC[p, pick.clamp(max=children_PC.shape[1] - 1)]
            ok = (pick < children_PC.shape[1]) & (chosen >= 0)
            fired_NF[row[ok], chosen[ok]] = True
        return fired_NF

    def _copula(self, fired_NF: torch.Tensor, free: torch.Tensor, n: int, g: torch.Generator) -> None:
        normal = torch.distributions.Normal(0.0, 1.0)
        share = float((self.loadings_FR[free] ** 2).sum(1).max()) if self.loadings_FR.shape[1] else 0.0
        z = torch.randn(n, int(free.sum()), generator=g) * (1 - share) ** 0.5
        if share > 0:
            z += torch.randn(n, self.loadings_FR.shape[1], generator=g) @ self.loadings_FR[free].T
        fired_NF[:, free] = z < normal.icdf(self.own_F[free].clamp(1e-12, 1 - 1e-12).float())

    def _sample(self, n: int, g: torch.Generator):
        fired_NF = self._fire(n, g)
        row, col = torch.nonzero(fired_NF, as_tuple=True)  # row-major: indices ascending within a row
        counts = fired_NF.sum(1)
        k = int(counts.max()) if n else 0
        crow = torch.nn.functional.pad(counts.cumsum(0), (1, 0))
        slot = torch.arange(len(row)) - crow[row]
        mags = (self.magnitude_mean + self.magnitude_std * torch.randn(len(row), generator=g)).abs()
        indices_NK = torch.full((n, k), -1, dtype=torch.int64)
        values_NK = torch.zeros(n, k)
        indices_NK[row, slot] = col
        values_NK[row, slot] = mags
        with warnings.catch_warnings():  # "sparse CSR support is in beta": its product with a dense matrix is sound
            warnings.simplefilter("ignore", UserWarning)
            codes = torch.sparse_csr_tensor(crow, col, mags, (n, len(self.parent_F)))
        x_ND = (codes @ self.features_FD) if len(row) else torch.zeros(n, self.features_FD.shape[1])
        if self.noise > 0:
            x_ND += self.noise * torch.randn(x_ND.shape, generator=g)
        return x_ND, indices_NK, values_NK


def _categorical(q_F: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """[n, F] bool, at most one True per row: feature i with probability q_i (sum q <= 1), none with the rest."""
    cum_F = q_F.cumsum(0).float()
    pick_N = (torch.rand(n, 1, generator=g) >= cum_F).sum(1)  # the first feature whose cumulative passes u
    return torch.nn.functional.one_hot(pick_N, len(q_F) + 1)[:, :-1].bool()


def _levels(parent_F: torch.Tensor) -> list[torch.Tensor]:
    """The parents of each level of children, top level first."""
    depth = torch.zeros(len(parent_F), dtype=torch.int64)
    has_parent = parent_F >= 0
    for _ in range(len(parent_F)):
        new = torch.where(has_parent, depth[parent_F.clamp(min=0)] + 1, 0)
        if torch.equal(new, depth):
            break
        depth = new
    return [torch.unique(parent_F[has_parent & (depth == lv)]) for lv in range(1, int(depth.max()) + 1)]


def _children(parent_F: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """[P, C] the children of each of `parents`, -1 padded."""
    lists = [torch.nonzero(parent_F == p).flatten() for p in parents.tolist()]
    width = max(len(c) for c in lists)
    return torch.stack([torch.nn.functional.pad(c, (0, width - len(c)), value=-1) for c in lists])


def _directions(F: int, d: int, superposition: float, g: torch.Generator) -> torch.Tensor:
    random_FD = torch.nn.functional.normalize(torch.randn(F, d, generator=g, dtype=torch.float64), dim=1)
    if superposition == 1:
        return random_FD.float()
    if F <= d:
        q, r = torch.linalg.qr(random_FD.T)  # orthonormal columns spanning the random directions, in their order
        ortho_FD = (q * torch.sign(torch.diagonal(r))).T
    else:  # as orthogonal as we can: descend on the squared off-diagonal cosines (O(F^2 d) per step)
        w = random_FD.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=0.01)
        for _ in range(100):
            u = torch.nn.functional.normalize(w, dim=1)
            gram = u @ u.T
            loss = (gram - torch.eye(F, dtype=gram.dtype)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ortho_FD = torch.nn.functional.normalize(w.detach(), dim=1)
    return torch.nn.functional.normalize(superposition * random_FD + (1 - superposition) * ortho_FD, dim=1).float()


def _hierarchy(cfg: ToyConfig, g: torch.Generator) -> torch.Tensor:
    """parent_F: trees of `children_per_parent` children over `hierarchy_depth` levels on a random subset of the
    features; within a tree the more frequent (lower-index) features sit higher."""
    F, b, depth = cfg.n_features, cfg.children_per_parent, cfg.hierarchy_depth
    per_tree = sum(b ** lv for lv in range(depth + 1))
    trees = int(cfg.hierarchy_fraction * F + 1e-9) // per_tree
    parent_F = torch.full((F,), -1, dtype=torch.int64)
    members = torch.randperm(F, generator=g)[:trees * per_tree].view(trees, per_tree).sort(dim=1).values
    for tree in members:
        for pos in range(1, per_tree):  # breadth-first positions: node pos's parent is (pos - 1) // b
            parent_F[tree[pos]] = tree[(pos - 1) // b]
    return parent_F


def _marginals(parent_F: torch.Tensor, tree: list, base_F: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(marginal_F, own_F) for power-law weights `base_F` times `scale` (see the module's docstring); `tree`: each
    level's (parents, children [P, C])."""
    q = (base_F * scale).clamp(max=1.0)
    own, marginal = q.clone(), torch.where(parent_F < 0, q, 0.0)
    for parents, children_PC in tree:
        mask = children_PC >= 0
        qc = torch.where(mask, q[children_PC.clamp(min=0)], 0.0)
        S = qc.sum(1, keepdim=True)
        m = marginal[parents].unsqueeze(1)
        given_parent = torch.where(S > 0, torch.minimum(m, S) / m.clamp(min=1e-300) * qc / S.clamp(min=1e-300), 0.0)
        own[children_PC[mask]] = given_parent[mask]
        marginal[children_PC[mask]] = (m * given_parent)[mask]
    return marginal, own


def toy_model(cfg: ToyConfig) -> ToyModel:
    """The toy model that `cfg` (presets resolved) describes; deterministic from cfg.seed and the options."""
    cfg = resolve(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    features_FD = _directions(cfg.n_features, cfg.d, cfg.superposition, g)
    parent_F = _hierarchy(cfg, g)
    tree = [(parents, _children(parent_F, parents)) for parents in _levels(parent_F)]
    base_F = torch.arange(1, cfg.n_features + 1, dtype=torch.float64) ** -cfg.frequency_exponent
    lo, hi = 0.0, 1.0 / float(base_F.min())  # at hi every q is 1; the mean L0 rises with the scale
    if float(_marginals(parent_F, tree, base_F, hi)[0].sum()) < cfg.l0 - 1e-9:
        raise ValueError(f"l0={cfg.l0} is more than this hierarchy allows "
                         f"({float(_marginals(parent_F, tree, base_F, hi)[0].sum()):.2f}: at most one child of a parent "
                         "fires); lower l0 or hierarchy_fraction")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(_marginals(parent_F, tree, base_F, mid)[0].sum()) < cfg.l0 else (lo, mid)
    marginal_F, own_F = _marginals(parent_F, tree, base_F, hi)
    if cfg.alone and float(own_F[parent_F < 0].sum()) > 1 + 1e-6:
        raise ValueError(f"alone: the free features' and roots' probabilities sum to {float(own_F[parent_F < 0].sum()):.3f} "
                         f"at l0={cfg.l0}, but one draw per row needs at most 1; lower l0")
    directions_FR = torch.nn.functional.normalize(torch.randn(cfg.n_features, cfg.correlation_rank, generator=g), dim=1)
    loadings_FR = directions_FR * cfg.correlation ** 0.5 * (parent_F < 0).unsqueeze(1)
    return ToyModel(features_FD, parent_F, marginal_F.float(), own_F, loadings_FR.float(), cfg.magnitude_mean,
                    cfg.magnitude_std, cfg.noise, cfg.alone)


def shard_generator(seed: int, shard: int) -> torch.Generator:
    """The generator of shard `shard`'s rows: a resumed store equals an uninterrupted one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + shard + 1) % 2**63)


def _record(cfg: ToyConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("run", "overwrite")}


def load_toy(folder: str | Path) -> tuple[ToyModel, ToyConfig]:
    """The toy model and its resolved config from a toy store (RUN/acts)."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if "toy" not in manifest:
        raise ValueError(f"{folder} is not a toy store (its manifest has no 'toy' record); write one with saex toy")
    path = folder / TRUE_FEATURES
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the toy stage writes it first; run saex toy again")
    from safetensors.torch import load_file

    t = load_file(path)
    cfg = ToyConfig(run=str(folder.parent), **manifest["toy"])
    return ToyModel(t["features_FD"], t["parent_F"], t["frequency_F"], t["own_F"], t["loadings_FR"],
                    cfg.magnitude_mean, cfg.magnitude_std, cfg.noise, cfg.alone), cfg


def toy(cfg: ToyConfig) -> dict:
    """The toy stage: writes RUN/acts/ (store + true features); returns the manifest. Resumes per shard."""
    with exclusive([Path(cfg.run) / "locks" / "acts.lock"], "saex toy"):
        return _toy(resolve(cfg))


def _toy(cfg: ToyConfig) -> dict:
    header = {
        "model": "toy", "model_family": "toy", "modality": "toy", "d_model": cfg.d, "hooks": [HOOK],
        "tokens": "all", "dataset": {"kind": "toy", "preset": cfg.preset, "seed": cfg.seed}, "label_names": None,
        "examples_planned": cfg.rows, "order": "dataset", "seed": cfg.seed, "dtype": "bfloat16",
        "batch_size": cfg.shard_rows, "context_size": None, "toy": _record(cfg),
    }
    store = Path(cfg.run) / "acts"
    writer = StoreWriter(store, header, cfg.shard_rows, cfg.overwrite)
    if writer.complete:
        print(f"{store} is already complete ({writer.manifest['rows']} rows); nothing to do")
        return writer.manifest
    model = toy_model(cfg)
    atomic_save_tensors(store / TRUE_FEATURES, model.tensors(), {"toy": str(_record(cfg))})
    configs.save(cfg, store / "config.json")
    log = JsonlLog(cfg.run, "toy")
    start = writer.examples_done
    log.write("start", resume_from=start, **header)
    bar = progress(cfg.rows, "toy", "rows", initial=start)
    t0 = time.perf_counter()
    for shard, first in enumerate(range(0, cfg.rows, cfg.shard_rows)):
        if first < start:
            continue
        n = min(cfg.shard_rows, cfg.rows - first)
        x_ND, _, _ = model.sample(n, shard_generator(cfg.seed, shard))
        rows = torch.arange(first, first + n)
        writer.add({acts_column(HOOK): x_ND.to(torch.bfloat16), "example": rows,
                    "position": torch.zeros(n, dtype=torch.int64), "label": torch.full((n,), -1),
                    "token": torch.full((n,), -1)}, [str(i) for i in rows.tolist()])
        bar.update(n)
        bar.set_postfix_str(f"{(first + n - start) / (time.perf_counter() - t0):,.0f} rows/s")
    bar.close()
    manifest = writer.finish()
    seconds = time.perf_counter() - t0
    log.write("end", rows=manifest["rows"], seconds=seconds)
    print(f"wrote {manifest['rows']:,} toy rows ({cfg.n_features} true features in {cfg.d} dimensions) into {store} "
          f"in {seconds:.1f} s")
    return manifest
