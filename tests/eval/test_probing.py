"""Sparse probing (saex.eval.probing): the k = d probe is the full probe, a planted latent is found, a
shuffled-label control sits at chance, train and test rows are disjoint, and eval and the explorer show it."""

import json

import numpy as np
import pytest
import torch

from saex.eval.probing import SCORES, ProbeRows, fit_probes, logistic_fit, pool_code, pool_rows, probing, scores, sparse_probe, split_rows
from saex.sae.code import Code


def _data(seed=0, n_per=200, classes=10, d_sae=64, d_in=16):
    """Balanced labels, sparse non-negative codes weakly tied to the label, raw activations likewise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per)
    codes = np.maximum(rng.normal(size=(len(y), d_sae)) - 1.0, 0) + 0.5 * np.eye(classes, d_sae)[y]
    raw = rng.normal(size=(len(y), d_in)) + np.eye(classes)[y] @ rng.normal(size=(classes, d_in))
    return codes, raw, y


def _full_probe(X, y, train, test):
    """The independent full probe: scipy's L-BFGS on the same objective, written out here (standardised
    columns, L2 with C = 1 on the weights, balanced class weights), on every column; test scores."""
    from scipy.optimize import minimize

    mean, std = X[train].mean(0), X[train].std(0)
    std[std == 0] = 1
    Z = np.c_[(X - mean) / std, np.ones(len(X))]
    Zt, yt = Z[train], y[train].astype(float)
    s = np.where(yt > 0, len(yt) / (2 * yt.sum()), len(yt) / (2 * (1 - yt).sum()))
    t = 2 * yt - 1

    def f(theta):
        m = t * (Zt @ theta)
        loss = 0.5 * theta[:-1] @ theta[:-1] + (s * np.logaddexp(0, -m)).sum()
        g = Zt.T @ (s * -t / (1 + np.exp(m)))
        g[:-1] += theta[:-1]
        return loss, g

    theta = minimize(f, np.zeros(Z.shape[1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "ftol": 0,
                                                                                      "maxiter": 10000}).x
    return theta, Z[test] @ theta


def _auroc(score, y):
    """Brute force: the share of (positive, negative) pairs ranked right, ties one half."""
    pos, neg = score[y][:, None], score[~y][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_k_equal_d_is_the_full_logistic_probe():
    codes, _, y = _data(d_sae=48)
    codes[:, 5] = 0.0  # a dead latent: constant columns must not break the equality
    train, test = split_rows(y)
    for c in (0, 3, 9):
        yc = y == c
        sparse = sparse_probe(codes, yc, train, test, k=codes.shape[1])
        theta, score = _full_probe(codes, yc, train, test)
        pred = score > 0
        assert sorted(sparse["latents"]) == list(range(48)) and sparse["converged"]
        assert sparse["accuracy"] == (pred == yc[test]).mean()
        assert sparse["balanced_accuracy"] == pytest.approx(0.5 * (pred[yc[test]].mean() + (~pred[~yc[test]]).mean()))
        assert sparse["auroc"] == pytest.approx(_auroc(score, yc[test]), abs=1e-6)
        X = (codes[train] - codes[train].mean(0)) / np.where(codes[train].std(0) > 0, codes[train].std(0), 1)
        fitted, converged = logistic_fit(torch.tensor(X)[None], torch.tensor(yc[train], dtype=torch.float64)[None])
        assert converged.all() and np.abs(fitted[0].numpy() - theta).max() < 1e-5
    # through probing(): with the SAE code as the "raw activations", k = d and the raw probe agree per label
    codes, _, y = _data(classes=3, d_sae=48)
    out = probing(codes, codes, y, ks=(1, codes.shape[1]))
    assert out["summary"]["labels"] == 3
    for row in out["labels"]:
        assert {s: row["sae"]["48"][s] for s in SCORES} == {s: row["raw"][s] for s in SCORES}


def test_more_features_than_rows_gives_the_same_probe():
    """fit_probes fits on the training rows' coordinates in their span when F > N: the same test scores
    as the fit on all F standardised features."""
    rng = np.random.default_rng(3)
    X = torch.tensor(rng.normal(size=(2, 60, 90)))  # 2 labels, 30 training and 30 test rows, 90 features
    for X in (X, X[:1].expand(2, -1, -1).clone()):  # each label its own features; one X shared (raw probes)
        y = (X[..., 0] + torch.tensor([[0.0], [1.0]]) * X[..., 1] > 0.3).double()  # label 1 also reads feature 1
        got = fit_probes(X[:, :30], y[:, :30], X[:, 30:], y[:, 30:])
        mean, std = X[:, :30].mean(1, keepdim=True), X[:, :30].std(1, unbiased=False, keepdim=True)
        theta, converged = logistic_fit((X[:, :30] - mean) / std, y[:, :30])
        score = (((X[:, 30:] - mean) / std) @ theta[:, :-1, None])[..., 0] + theta[:, -1:]
        assert converged.all()
        for i in range(2):
            want = scores(score[i], y[i, 30:])
            assert {s: got[i][s] for s in SCORES} == pytest.approx(want, abs=1e-9)
            assert got[i]["auroc"] > 0.5  # not a degenerate probe that any basis would reproduce


def test_only_the_most_frequent_labels_are_probed(monkeypatch):
    monkeypatch.setattr("saex.eval.probing.MAX_LABELS", 2)
    codes, raw, y = _data(n_per=20, classes=4, d_sae=8, d_in=4)
    keep = (y != 1) | (np.arange(len(y)) % 2 == 0)  # label 1 has 10 rows, the others 20
    y[(y == 3) & (np.arange(len(y)) % 4 == 0)] = -1  # label 3 has 15
    out = probing(codes[keep], raw[keep], y[keep])
    assert [r["label"] for r in out["labels"]] == [0, 2] and out["unprobed_labels"] == 2


def test_auroc_and_balanced_accuracy_against_hand_counts():
    score = torch.tensor([2.0, -1.0, 0.5, 0.5, -3.0, 1.0])
    y = torch.tensor([1, 0, 1, 0, 0, 1])
    # pairs (pos, neg): 2 beats all 3; 0.5 beats -1 and -3, ties 0.5; 1 beats all 3 -> (3 + 2.5 + 3) / 9
    # predictions > 0: positives 3/3 right, negatives 2/3 right (the negative at 0.5 is called positive)
    assert scores(score, y) == pytest.approx({"accuracy": 5 / 6, "balanced_accuracy": (1 + 2 / 3) / 2,
                                              "auroc": 8.5 / 9})


def test_a_planted_latent_is_found_and_shuffled_labels_sit_at_chance():
    codes, raw, y = _data(seed=1)
    codes[:, 7] = (y == 3).astype(float)  # latent 7 is exactly "label 3"
    out = probing(codes, raw, y)
    row = next(r for r in out["labels"] if r["label"] == 3)
    assert row["best_latent"] == 7 and row["sae"]["1"]["latents"] == [7]
    assert row["sae"]["1"]["accuracy"] == 1.0 and row["sae"]["1"]["balanced_accuracy"] == 1.0
    # 200 per class split 100/100: every one-vs-rest test set is 100 positives in 1,000 rows
    assert all(r["majority"] == 0.9 for r in out["labels"]) and out["summary"]["majority"] == 0.9
    assert out["summary"]["raw"]["balanced_accuracy"] > 0.9  # the raw activations carry the labels

    sparse = probing(torch.tensor(codes).to_sparse(), raw, y)  # what eval passes: pooled codes kept sparse
    assert [(r["sae"], r["raw"], r["best_latent"]) for r in sparse["labels"]] == \
        [(r["sae"], r["raw"], r["best_latent"]) for r in out["labels"]]

    shuffled = probing(codes, raw, np.random.default_rng(2).permutation(y))
    s = shuffled["summary"]
    # chance: balanced accuracy and AUROC 0.5; the mean over 10 labels of 100-positive test sets has
    # a standard deviation near 0.5 * sqrt(1/100 + 1/900) / sqrt(10) = 0.017
    for probe in (s["sae"]["1"], s["sae"]["5"], s["raw"]):
        assert abs(probe["balanced_accuracy"] - 0.5) < 0.06 and abs(probe["auroc"] - 0.5) < 0.06
        assert probe["accuracy"] < s["majority"]  # balanced weights: no probe earns 0.9 by saying "no"


def test_train_and_test_rows_are_disjoint_and_stratified():
    y = np.array([0] * 7 + [1] * 10 + [2] * 3 + [-1] * 4)
    train, test = split_rows(y[y >= 0], train_frac=0.5)
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(20))
    assert [int((y[train] == c).sum()) for c in (0, 1, 2)] == [4, 5, 2]  # n / 2 of each class, halves rounded up
    rng = np.random.default_rng(0)
    out = probing(rng.random((24, 8)), rng.random((24, 4)), y)
    assert out["train_examples"] + out["test_examples"] == 20  # label -1 rows are not probed
    assert out["skipped_labels"] == ["2"]  # 2 training and 1 test positive: below MIN_POSITIVES
    with pytest.raises(ValueError, match="train_frac=1.5"):
        split_rows(y, 1.5)


def test_pooling_means_each_examples_tokens():
    rows_T = torch.tensor([0, 0, 2])  # example 1 has no selected token
    x_TD = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]])
    assert pool_rows(x_TD, rows_T, 3).tolist() == [[2.0, 4.0], [0.0, 0.0], [5.0, 5.0]]
    code = Code(torch.tensor([[2.0, 1.0], [4.0, 0.0], [3.0, 0.0]]), torch.tensor([[1, 3], [1, 0], [0, 0]]), 4)
    assert pool_code(code.values_BK, code.indices_BK, rows_T, 3, 4).tolist() == \
        [[0.0, 3.0, 0.0, 0.5], [0.0] * 4, [3.0, 0.0, 0.0, 0.0]]


def test_probe_rows_pool_each_example_and_drop_those_without_tokens():
    rows = ProbeRows()
    mask_BT = torch.tensor([[True, True], [False, False], [False, True]])  # example 1: no selected token
    rows_T = rows.add_batch(mask_BT, torch.tensor([0, 1, 1]))
    assert rows_T.tolist() == [0, 0, 2]
    code = Code(torch.tensor([[2.0], [4.0], [3.0]]), torch.tensor([[1], [1], [0]]), 3)
    rows.add("sae", code, torch.tensor([[1.0], [3.0], [5.0]]), rows_T)
    assert torch.cat(rows.codes["sae"]).to_dense().tolist() == [[0, 3, 0], [0, 0, 0], [3, 0, 0]]
    assert torch.cat(rows.raw["sae"]).tolist() == [[2.0], [0.0], [5.0]]
    assert torch.cat(rows.has_rows).tolist() == [True, False, True]
    assert rows.result("sae") is None and rows.result("other") is None  # 2 examples: nothing to probe


def test_eval_writes_probing_and_the_overview_shows_it(image_run):
    from fastapi.testclient import TestClient

    from saex.explorer.app import create_app

    m = json.loads((image_run / "saes" / "topk-k8" / "metrics.json").read_text())
    p = m["probing"]
    assert p["pooling"] == "mean" and p["ks"] == [1, 2, 5]
    assert p["train_examples"] + p["test_examples"] == m["examples"]
    assert p["summary"]["labels"] == len(p["labels"]) >= 2
    row = p["labels"][0]
    assert 0 <= row["best_latent"] < m["d_sae"] and row["sae"]["1"]["latents"] == [row["best_latent"]]
    assert len(row["sae"]["5"]["latents"]) == 5 and 0.5 <= row["majority"] < 1
    html = TestClient(create_app(image_run)).get("/").text
    assert "Sparse probing" in html and f'href="/feature/{row["best_latent"]}"' in html
    assert f'{row["sae"]["1"]["balanced_accuracy"]:.3f}' in html and f'{row["raw"]["balanced_accuracy"]:.3f}' in html
