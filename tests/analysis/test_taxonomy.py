"""The logit-weight taxonomy: statistics against scipy, classes of hand-made weight vectors."""

import numpy as np
import pytest
import scipy.stats
import torch

from saex.analysis.taxonomy import HEAVY, SIDED, SPLIT, SPLIT_MIN_OUTPUTS, classify, skew_kurtosis


def _tails(n=5000, up=0, down=0, height=12.0, seed=0):
    """A Gaussian bulk of n weights with `up` outputs at +height and `down` at -height."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n)
    w[:up] = height
    w[up:up + down] = -height
    return w


def test_skew_and_kurtosis_equal_scipys_defaults():
    rng = np.random.default_rng(1)
    rows = np.stack([rng.standard_normal(300), rng.exponential(size=300), -rng.gamma(0.5, size=300),
                     rng.standard_t(3, size=300), rng.uniform(size=300), _tails(300, 4, 1)])
    skew, kurt = skew_kurtosis(torch.from_numpy(rows))
    np.testing.assert_allclose(skew.numpy(), scipy.stats.skew(rows, axis=1), rtol=1e-12)
    np.testing.assert_allclose(kurt.numpy(), scipy.stats.kurtosis(rows, axis=1), rtol=1e-12)  # Fisher, biased
    # hand-computed: one class alone among 10 -> skew 8/3, excess kurtosis 73/9 - 3
    s, k = skew_kurtosis(torch.tensor([[1.0] + [0.0] * 9], dtype=torch.float64))
    assert s.item() == pytest.approx(8 / 3) and k.item() == pytest.approx(73 / 9 - 3)


def test_float32_statistics_stay_close_to_scipys():
    rows = np.stack([_tails(50_000, 30, 0, seed=s) for s in range(3)])
    skew, kurt = skew_kurtosis(torch.from_numpy(rows).float())
    np.testing.assert_allclose(skew.numpy(), scipy.stats.skew(rows, axis=1), rtol=1e-4)
    np.testing.assert_allclose(kurt.numpy(), scipy.stats.kurtosis(rows, axis=1), rtol=1e-4)


def test_constant_rows_have_no_statistics_and_no_class():
    skew, kurt = skew_kurtosis(torch.full((2, 50), 0.3, dtype=torch.float64))
    assert torch.isnan(skew).all() and torch.isnan(kurt).all()
    with pytest.warns(RuntimeWarning):  # scipy agrees (and warns of the cancellation)
        assert np.isnan(scipy.stats.skew(np.full(50, 0.3)))
    assert classify(skew, kurt) == ["none", "none"]


def test_hand_made_weight_vectors_give_the_three_classes_and_none():
    rows = torch.from_numpy(np.stack([
        _tails(up=25),  # a heavy positive tail
        _tails(down=25),  # a heavy negative tail
        _tails(up=25, down=25),  # both
        np.where(np.arange(5000) % 2 == 0, 3.0, -3.0) + np.random.default_rng(2).standard_normal(5000) * 0.3,  # split
        _tails(),  # a Gaussian bell
    ]))
    skew, kurt = skew_kurtosis(rows)
    assert classify(skew, kurt) == ["prediction", "suppression", "partition", "partition", "none"]
    assert kurt[0] > HEAVY and skew[0] > SIDED and skew[1] < -SIDED and abs(skew[2]) <= SIDED and kurt[3] < SPLIT


def test_thresholds_are_where_the_classes_change():
    skew = torch.tensor([SIDED + 0.01, SIDED, -SIDED - 0.01, 0.0, 0.0, 0.0, float("nan")])
    kurt = torch.tensor([HEAVY + 0.01, HEAVY + 0.01, HEAVY + 0.01, HEAVY, SPLIT - 0.01, SPLIT, 5.0])
    assert classify(skew, kurt) == ["prediction", "partition", "suppression", "none", "partition", "none", "none"]
    # ten classes: a low kurtosis is chance as often as not (3 % of Gaussian samples of 10), so no split class
    assert classify(torch.tensor([0.0]), torch.tensor([SPLIT - 0.3]), outputs=10) == ["none"]
    assert classify(torch.tensor([0.0]), torch.tensor([SPLIT - 0.3]), outputs=SPLIT_MIN_OUTPUTS) == ["partition"]
    with pytest.raises(ValueError, match="thresholds"):
        classify(skew, kurt, split=0.5)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        skew_kurtosis(torch.zeros(5))
