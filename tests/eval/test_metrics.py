import math

import pytest
import torch

from saex.eval.metrics import ReconstructionStats
from saex.eval.splice import SpliceStats


def test_reconstruction_metrics_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    f = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    s = ReconstructionStats(3)
    s.update(x[:2], x_hat[:2], f[:2])  # two batches accumulate like one
    s.update(x[2:], x_hat[2:], f[2:])
    m = s.result()
    # squared error 0 + 1 + 1 = 2; about the mean (2/3, 2/3): 5/9 + 5/9 + 2/9 = 4/3
    assert m["fvu"] == pytest.approx(2 / (4 / 3))
    assert m["explained_variance"] == pytest.approx(1 - 1.5)
    assert m["mse"] == pytest.approx(2 / 3) and m["mse_per_dim"] == pytest.approx(1 / 3)
    assert m["cosine"] == pytest.approx((1 + 0 + 3 / math.sqrt(10)) / 3)
    assert m["l0"] == pytest.approx(1.0)
    assert m["density"] == pytest.approx([2 / 3, 1 / 3, 0])
    assert m["dead_frac"] == pytest.approx(1 / 3) and m["dense_frac"] == pytest.approx(2 / 3)
    assert sum(m["density_hist"]["counts"]) == 2  # the two live latents


def _ce(logits, label):
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


def test_classifier_splice_metrics_by_hand():
    clean = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    sae = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    zero = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    s = SpliceStats("classifier")
    s.update({"clean": clean, "sae": sae, "zero": zero}, labels, None)
    r = s.result()
    lc = (_ce([2, 0], 0) + _ce([0, 1], 1)) / 2
    ls = (_ce([1, 0], 0) + _ce([0, 0.5], 1)) / 2
    lz = math.log(2)
    assert r["loss_clean"] == pytest.approx(lc) and r["loss_sae"] == pytest.approx(ls)
    assert r["loss_zero"] == pytest.approx(lz)
    assert r["loss_recovered"] == pytest.approx((lz - ls) / (lz - lc))
    p = torch.softmax(clean, -1)
    q = torch.softmax(sae, -1)
    assert r["kl"] == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-5)
    assert r["accuracy_clean"] == 1.0 and r["accuracy_zero"] == 0.5  # argmax of equal logits is class 0


def test_next_token_splice_uses_shifted_targets_and_skips_padding():
    V = 3
    ids = torch.tensor([[0, 1, 2], [2, 0, 0]])
    attention = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = torch.zeros(2, 3, V)
    logits[0, 0, 1] = 5.0  # predicts token 1 after token 0: right
    s = SpliceStats("next_token")
    s.update({"clean": logits, "sae": logits, "zero": torch.zeros(2, 3, V), "input_ids": ids}, None, attention)
    r = s.result()
    expected = (_ce([0, 5, 0], 1) + _ce([0, 0, 0], 2) + _ce([0, 0, 0], 0)) / 3  # three real (t, t+1) pairs
    assert s.count == 3 and r["loss_clean"] == pytest.approx(expected, rel=1e-5)
    assert r["loss_recovered"] == pytest.approx(1.0) and r["kl"] == pytest.approx(0.0, abs=1e-7)


def test_embedding_splice():
    clean = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    sae = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    zero = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    s = SpliceStats("embedding")
    s.update({"clean": clean, "sae": sae, "zero": zero}, None, None)
    r = s.result()
    assert r["loss_clean"] == 0.0
    assert r["loss_sae"] == pytest.approx((1 - 1 / math.sqrt(2)) / 2) and r["loss_zero"] == pytest.approx(1.0)
    assert r["loss_recovered"] == pytest.approx(1 - (1 - 1 / math.sqrt(2)) / 2)
