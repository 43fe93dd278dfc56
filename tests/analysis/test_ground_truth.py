"""Ground-truth metrics (saex.analysis.ground_truth) against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from saex.analysis import ground_truth as gt
from saex.sae.code import Code


def _metrics(W, code, feats, idx, vals, parent, x=None, x_hat=None):
    x = torch.ones(idx.shape[0], feats.shape[1]) if x is None else x
    return gt.ground_truth_metrics(W, code, feats, idx, vals, parent, x, x if x_hat is None else x_hat)


def _toy_rows(F=12, d=16, n=400, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(n)])
    idx[::5, -1] = -1  # some rows hold fewer features
    vals = torch.rand(n, k, generator=g) + 0.1
    vals[idx < 0] = 0
    return feats, idx, vals


def test_permuted_sign_flipped_decoder_with_true_codes_scores_one():
    F = 12
    feats, idx, vals = _toy_rows(F)
    perm = torch.randperm(F, generator=torch.Generator().manual_seed(1))  # latent s is feature perm[s]
    signs = torch.tensor([1.0, -1.0] * (F // 2))
    W = feats[perm] * signs[:, None]
    inv = torch.argsort(perm)  # feature f is latent inv[f]
    dense = torch.zeros(len(idx), F)
    keep = idx >= 0
    dense[torch.arange(len(idx))[:, None].expand_as(idx)[keep], inv[idx[keep]]] = vals[keep]
    parent = torch.full((F,), -1)
    for code in (dense, Code.from_dense(dense)):
        m = _metrics(W, code, feats, idx, vals, parent)
        assert m["gt_matching"] == "hungarian" and m["gt_features"] == F
        assert m["gt_mcc"] == pytest.approx(1.0) and m["gt_mmcs"] == pytest.approx(1.0)
        assert m["gt_f1"] == pytest.approx(1.0) and m["gt_precision"] == 1.0 and m["gt_recall"] == 1.0
        assert m["gt_unique_frac"] == 1.0 and m["gt_latents_per_feature"] == 1.0
        assert m["gt_absorption"] is None and m["gt_pairs"] == 0


def _expected_max_abs_cos(d: int, S: int) -> float:
    """E max over S independent random unit vectors of |cos| with a fixed unit vector in R^d:
    |cos| has density proportional to (1 - t^2)^((d - 3) / 2) on [0, 1]; E max = int_0^1 1 - P(t)^S dt."""
    t = np.linspace(0, 1, 200001)
    pdf = (1 - t ** 2) ** ((d - 3) / 2)
    cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]
    return float(np.trapezoid(1 - cdf ** S, t) if hasattr(np, "trapezoid") else np.trapz(1 - cdf ** S, t))


def test_random_decoder_sits_at_the_chance_level():
    d, S, F = 32, 64, 32
    feats = torch.nn.functional.normalize(torch.randn(F, d, generator=torch.Generator().manual_seed(0)), dim=1)

    def scores(seed):
        W = torch.randn(S, d, generator=torch.Generator().manual_seed(seed))
        cos = gt.cosines(W, feats)
        latent_F, _ = gt.match(cos)
        return float(cos[latent_F, torch.arange(F)].abs().mean()), float(cos.abs().max(0).values.mean())

    mcc, mmcs = scores(100)
    chance_mcc = np.mean([scores(s)[0] for s in range(1, 9)])  # simulated with other seeds
    analytic_mmcs = _expected_max_abs_cos(d, S)  # about 0.45 for d = 32, S = 64
    assert 0.40 < analytic_mmcs < 0.50
    assert mmcs == pytest.approx(analytic_mmcs, abs=0.04)
    assert mcc == pytest.approx(chance_mcc, abs=0.03) and mcc < mmcs
    # through the full metric function
    W = torch.randn(S, d, generator=torch.Generator().manual_seed(100))
    idx = torch.zeros(4, 1, dtype=torch.int64)
    m = _metrics(W, torch.zeros(4, S), feats, idx, torch.ones(4, 1), torch.full((F,), -1))
    assert m["gt_mcc"] == pytest.approx(mcc) and m["gt_mmcs"] == pytest.approx(mmcs)


def test_fewer_latents_than_features_count_unmatched_as_zero():
    feats = torch.eye(3)
    m = _metrics(torch.eye(3)[:2] * 2, torch.zeros(2, 2), feats, torch.tensor([[0], [2]]), torch.ones(2, 1),
                 torch.full((3,), -1))
    assert m["gt_mcc"] == pytest.approx(2 / 3)
    # feature 2 is active on row 1 but unmatched: recall 0, F1 0; feature 0 active on row 0, latent 0 silent
    assert m["gt_recall"] == 0.0 and m["gt_f1"] == 0.0 and m["gt_precision"] is None


def test_matching_maximises_the_sum_not_the_first_pair():
    cos = torch.tensor([[0.9, 0.8], [0.85, 0.1]], dtype=torch.float64)
    latent_F, method = gt.match(cos)
    assert method == "hungarian" and latent_F.tolist() == [1, 0]  # 0.8 + 0.85 = 1.65 beats greedy's 0.9 + 0.1


def test_two_latents_on_one_feature():
    W = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0.3, 0]), torch.tensor([0, 0, 1.0])])
    u = gt.uniqueness(gt.cosines(W, torch.eye(3)))
    # latents 0 and 1 both claim feature 0 (cos 1 and 1/sqrt(1.09) = 0.958), latent 2 claims feature 2
    assert u == {"gt_unique_frac": pytest.approx(1 / 3), "gt_claimed_frac": pytest.approx(2 / 3),
                 "gt_latents_per_feature": pytest.approx(1.5)}
    m = _metrics(W, torch.zeros(1, 3), torch.eye(3), torch.tensor([[0]]), torch.ones(1, 1), torch.full((3,), -1))
    # one-to-one: 0 <- latent 0 (1), 1 <- latent 1 (0.3 / sqrt(1.09)), 2 <- latent 2 (1)
    assert m["gt_mcc"] == pytest.approx((2 + 0.3 / math.sqrt(1.09)) / 3)


def test_shrinkage_and_bias():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert gt.shrinkage(x, 0.8 * x) == {"gt_shrinkage": pytest.approx(0.8), "gt_bias": pytest.approx(0.8)}
    # x = (1, 0), x_hat = (1, 1): ||x_hat|| / ||x|| = sqrt 2; gamma = ||x_hat||^2 / <x_hat, x> = 2
    s = gt.shrinkage(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert s == {"gt_shrinkage": pytest.approx(math.sqrt(2)), "gt_bias": pytest.approx(2.0)}


def _absorption_case(child_mix: float):
    """Features e0 (parent), e1 (its child), e2 (a root); 10 rows: child (with parent) on rows 0-3, the parent
    alone on rows 4-5. The parent latent fires on rows 0, 4, 5 (not on child rows 1-3); the child latent,
    e1 + child_mix e0, fires on rows 0-2."""
    feats, parent = torch.eye(3), torch.tensor([-1, 0, -1])
    W = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([child_mix, 1.0, 0]), torch.tensor([0, 0, 1.0])])
    idx = torch.full((10, 2), -1)
    idx[:4] = torch.tensor([0, 1])
    idx[4:6, 0] = 0
    vals = (idx >= 0).float()
    f = torch.zeros(10, 3)
    f[[0, 4, 5], 0] = 1.0
    f[[0, 1, 2], 1] = 2.0
    return _metrics(W, f, feats, idx, vals, parent)


def test_absorption_on_a_hand_built_case():
    m = _absorption_case(0.5)
    # absorbed: child rows where the parent latent is silent and the child latent fires: rows 1, 2 of 0-3
    assert m["gt_absorption"] == pytest.approx(0.5) and m["gt_pairs"] == 1
    (pair,) = m["gt_absorption_pairs"]
    assert pair["parent"] == 0 and pair["child"] == 1 and pair["child_rows"] == 4
    assert pair["parent_cos"] == pytest.approx(0.5 / math.sqrt(1.25))
    # detection: parent TP 3 FN 3 (F1 2/3, recall 1/2), child TP 3 FN 1 (F1 6/7, recall 3/4); feature 2
    # is never active and its latent never fires: undefined, left out of the means
    assert m["gt_f1"] == pytest.approx((2 / 3 + 6 / 7) / 2)
    assert m["gt_recall"] == pytest.approx(0.625) and m["gt_precision"] == 1.0
    # the same firing with a pure child latent is a miss, not absorption
    assert _absorption_case(0.0)["gt_absorption"] == 0.0


def test_heat_map_orders_by_hierarchy_and_match(tmp_path):
    parent = torch.tensor([-1, 0, -1, 0, 2])
    assert gt.hierarchy_order(parent) == [0, 1, 3, 2, 4]
    assert gt.hierarchy_order(torch.tensor([-1, 2, 1])) == [0, 1, 2]  # a cycle comes last
    feats = torch.eye(5)
    perm = torch.tensor([3, 0, 4, 1, 2])  # latent s is feature perm[s]
    W = torch.cat([feats[perm], torch.tensor([[0, 0.1, 0, 0, 1.0]])])  # an extra latent near feature 4
    cos, features, latents = gt.heat_map(W, feats, parent)
    assert features == [0, 1, 3, 2, 4] and latents == [1, 3, 0, 4, 2, 5]
    assert cos.shape == (5, 6) and torch.allclose(cos[:, :5], torch.eye(5, dtype=torch.float64))
    path = gt.heat_map_png(W, feats, parent, tmp_path / "gt" / "ground_truth.png", title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


# --- saex eval on a toy store (saex.toy) ---------------------------------------------------------------------


def _orthogonal_toy(run, n_features=8, d=16):
    """Orthogonal true features, no hierarchy or correlation, one active per row on average (mostly alone:
    the toy's firing is independent, so about a quarter of active rows hold two)."""
    from saex.toy import ToyConfig, toy

    toy(ToyConfig(run=str(run), n_features=n_features, d=d, rows=8192, l0=1.0, frequency_exponent=0.0,
                  correlation=0.0, hierarchy_fraction=0.0, superposition=0.0, noise=0.0, magnitude_std=0.1,
                  shard_rows=8192))


def _train(run, architecture, d_sae, steps=600, k=1):
    extra = ["--k", str(k)] if architecture in ("topk", "batchtopk") else []
    from saex.cli import main

    assert main(["train", "--run", str(run), "--architecture", architecture, "--d-sae", str(d_sae), "--steps",
                 str(steps), "--batch-size", "128", "--lr", "3e-3", *extra]) == 0


def test_eval_on_a_toy_store_writes_ground_truth_metrics(tmp_path):
    import json

    from saex.cli import main
    from saex.sae.config import SAEConfig
    from saex.sae.io import save_sae
    from saex.sae.model import SAE

    _orthogonal_toy(tmp_path)
    _train(tmp_path, "topk", d_sae=8, k=1)  # k = the true L0, d_sae = n_features
    d, S = 16, 8
    random_sae = SAE(SAEConfig(d_in=d, d_sae=S, architecture="topk", k=1))
    random_sae.init_tied(generator=torch.Generator().manual_seed(5))
    save_sae(random_sae, tmp_path / "saes" / "random")
    assert main(["eval", "--run", str(tmp_path), "--examples", "1000"]) == 0
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained, rand = results["topk"], results["random"]
    assert trained["examples"] == 1000 and trained["gt_features"] == 8 and trained["gt_matching"] == "hungarian"
    assert trained["gt_mcc"] > 0.8 and trained["gt_f1"] > 0.6 and trained["fvu"] < 0.6  # seen: 0.89, FVU 0.38
    # a random decoder sits at the chance level: Hungarian-matched |cos| of random directions, simulated here
    feats = torch.eye(d)[:8]  # any orthonormal set: chance does not depend on which

    def chance(seed):
        cos = gt.cosines(torch.randn(S, d, generator=torch.Generator().manual_seed(seed)), feats)
        latent_F, _ = gt.match(cos)
        return float(cos[latent_F, torch.arange(8)].abs().mean())

    level = np.mean([chance(s) for s in range(200)])  # about 0.41 for 8 latents, 8 features in 16 dimensions
    assert rand["gt_mcc"] == pytest.approx(level, abs=0.2) and rand["gt_mcc"] < 0.7
    per_sae = json.loads((tmp_path / "saes" / "topk" / "metrics.json").read_text())
    assert "gt_absorption_pairs" in per_sae and "gt_absorption_pairs" not in trained
    assert per_sae["gt_pairs"] == 0 and per_sae["gt_absorption"] is None  # no hierarchy in this toy
    assert (tmp_path / "saes" / "topk" / "ground_truth.png").stat().st_size > 1000


# Orthogonal features that fire alone (at most one per row), magnitudes |N(1, 0.5)|, an SAE twice as wide as the
# truth, and each architecture's sparsity set for L0 ~1 (the defaults suit real activations, not one feature per
# row: L1 lambda 5 shrinks these rows by a third; JumpReLU's thresholds started at L0 64 never come down to 1).
# Seen (1,500 steps): topk 1.000, batchtopk 1.000, gated 0.999, relu 0.998, prolu 0.995, jumprelu 1.000.
_SETTINGS = {"topk": ["--k", "1"], "batchtopk": ["--k", "1"], "gated": [], "relu": ["--sparsity-coefficient", "1"],
             "prolu": ["--sparsity-coefficient", "1"], "jumprelu": ["--jumprelu-init-l0", "1"]}


def test_every_architecture_recovers_orthogonal_features_that_fire_alone(tmp_path):
    import json

    from saex.cli import main
    from saex.toy import ToyConfig, toy

    toy(ToyConfig(run=str(tmp_path), n_features=8, d=16, rows=8192, l0=0.9, alone=True, frequency_exponent=0.0,
                  correlation=0.0, hierarchy_fraction=0.0, superposition=0.0, noise=0.0, magnitude_std=0.5,
                  shard_rows=8192))
    for architecture, flags in _SETTINGS.items():
        assert main(["train", "--run", str(tmp_path), "--architecture", architecture, "--name", architecture,
                     "--d-sae", "16", "--steps", "1500", "--batch-size", "128", "--lr", "3e-3", *flags]) == 0
    assert main(["eval", "--run", str(tmp_path), "--examples", "2000"]) == 0
    results = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    mcc = {a: round(results[a]["gt_mcc"], 3) for a in _SETTINGS}
    assert all(v > 0.95 for v in mcc.values()), mcc
