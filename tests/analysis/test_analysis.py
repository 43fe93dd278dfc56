import math

import numpy as np
import pytest
import torch

from saex.analysis.alignment import neuron_alignment
from saex.analysis.clusters import low_density_cluster, mean_pairwise_cosine, otsu_threshold
from saex.analysis.labels import entropy_bits, label_distribution
from saex.analysis.topk import PerLatentTopK, per_example_max


def test_streaming_topk_equals_a_global_sort():
    g = torch.Generator().manual_seed(0)
    S, k, N = 7, 3, 500
    latent = torch.randint(0, S, (N,), generator=g)
    value = torch.rand(N, generator=g)
    example = torch.arange(N)
    top = PerLatentTopK(S, k)
    for s in range(0, N, 37):  # in uneven chunks
        top.update(latent[s:s + 37], value[s:s + 37], example[s:s + 37], value[s:s + 37])
    for j in range(S):
        mine = value[latent == j].sort(descending=True).values[:k]
        assert torch.equal(top.value_SK[j, :len(mine)], mine)
        assert torch.equal(value[top.example_SK[j, :len(mine)]], mine)


def test_topk_leaves_short_lists_empty():
    top = PerLatentTopK(3, 4)
    top.update(torch.tensor([1, 1]), torch.tensor([0.5, 0.7]), torch.tensor([10, 11]), torch.tensor([0.5, 0.7]))
    assert top.example_SK[1].tolist() == [11, 10, -1, -1] and top.example_SK[0].tolist() == [-1] * 4


def test_per_example_max():
    ex, lat, val = per_example_max(torch.tensor([0, 0, 1, 0]), torch.tensor([2, 2, 2, 1]),
                                   torch.tensor([0.1, 0.9, 0.3, 0.4]), d_sae=4)
    got = sorted(zip(ex.tolist(), lat.tolist(), [round(v, 3) for v in val.tolist()]))
    assert got == [(0, 1, 0.4), (0, 2, 0.9), (1, 2, 0.3)]


def test_label_entropy_by_hand():
    labels = torch.tensor([[0, 1, 1, -1], [2, 2, 2, 2], [-1, -1, -1, -1]])
    acts = torch.tensor([[1.0, 1.0, 2.0, 5.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    p = label_distribution(labels, acts, n_labels=3, top=20)
    assert p[0].tolist() == pytest.approx([0.25, 0.75, 0.0])  # weights 1 vs 1+2; the unlabelled one ignored
    h = entropy_bits(p)
    assert h[0].item() == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert h[1].item() == 0.0 and h[2].item() == 0.0
    assert label_distribution(labels, acts, 3, top=1)[0].tolist() == [1.0, 0.0, 0.0]


def test_neuron_alignment_finds_planted_neurons():
    g = torch.Generator().manual_seed(1)  # not the baseline's seed 0, or its random vectors would be these neurons
    neurons = torch.randn(256, 64, generator=g)
    encoder = torch.randn(64, 10, generator=g)
    encoder[:, 3] = neurons[17] * 2  # feature 3 is neuron 17
    result = neuron_alignment(encoder, neurons)
    assert result["neuron"][3] == 17 and result["max_cos"][3] == pytest.approx(1.0, abs=1e-5)
    lo, hi = result["random_range"]
    assert 0 < lo < hi < 0.9 and result["n_above_random"][3] >= 1
    assert (result["max_cos"][[0, 1, 2, 4]] < 0.9).all()


def test_otsu_and_the_low_density_cluster():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-2, 0.2, 300), rng.normal(1, 0.2, 100)])
    cut = otsu_threshold(values)
    assert -1.5 < cut < 0.5
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(32, 1, generator=g)
    encoder = torch.cat([shared + 0.1 * torch.randn(32, 300, generator=g), torch.randn(32, 100, generator=g)], 1)
    live = np.ones(400, dtype=bool)
    out = low_density_cluster(values, live, encoder)
    assert out["member"][:300].all() and not out["member"][300:].any()
    assert out["mean_cos_in"] > 0.9 > 0.2 > abs(out["mean_cos_out"])
    unrelated = low_density_cluster(values, live, torch.randn(32, 400, generator=g))  # a band, but no shared direction
    assert not unrelated["member"].any() and unrelated["mean_cos_in"] < 0.3


def test_mean_pairwise_cosine_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs: (1,2) 0, (1,3) 1/sqrt2, (2,3) 1/sqrt2
    assert mean_pairwise_cosine(v) == pytest.approx(2 / math.sqrt(2) / 3)
