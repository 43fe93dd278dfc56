"""The toy stage: a store of synthetic activations whose true features are known."""

import json

import pytest
import torch

from saex.cli import main
from saex.store import ActivationStore
from saex.toy import ToyConfig, load_toy, shard_generator, toy, toy_model

SMALL = dict(n_features=64, d=16, rows=3000, shard_rows=1000)


def _fired(model, n, seed=1):
    _, idx, _ = model.sample(n, torch.Generator().manual_seed(seed))
    fired = torch.zeros(n, len(model.parent_F) + 1, dtype=torch.bool)
    fired[torch.arange(n).unsqueeze(1).expand_as(idx), idx.clamp(min=-1) % (len(model.parent_F) + 1)] = True
    return fired[:, :-1]  # the -1 padding lands in the last column


def test_store_reads_back_as_the_model_samples(tmp_path):
    manifest = toy(ToyConfig(run=str(tmp_path), **SMALL))
    assert manifest["complete"] and manifest["rows"] == 3000 and manifest["hooks"] == ["toy"]
    store = ActivationStore(tmp_path / "acts")
    model, cfg = load_toy(tmp_path / "acts")
    assert cfg.n_features == 64 and cfg.l0 == 5.0  # the small preset filled the rest
    expected = torch.cat([model.sample(1000, shard_generator(0, s))[0] for s in range(3)]).to(torch.bfloat16)
    store.verify()
    got = torch.cat([store.shard(i, "acts.toy") for i in range(3)])
    assert torch.equal(torch.cat([store.shard(i, "example") for i in range(3)]), torch.arange(3000))
    assert all((store.shard(i, "position") == 0).all() and (store.shard(i, "label") == -1).all() for i in range(3))
    assert torch.equal(got, expected)
    fresh = toy_model(ToyConfig(run="elsewhere", **SMALL))
    assert torch.equal(fresh.features_FD, model.features_FD) and torch.equal(fresh.parent_F, model.parent_F)


def test_features_are_unit_and_frequencies_match():
    model = toy_model(ToyConfig(run="x", n_features=128, d=32, l0=6.0))
    assert model.features_FD.dtype == torch.float32 and model.parent_F.dtype == torch.int64
    torch.testing.assert_close(model.features_FD.norm(dim=1), torch.ones(128))
    assert abs(float(model.frequency_F.sum()) - 6.0) < 1e-4  # the power law is scaled to the asked L0
    n = 40_000
    rate = _fired(model, n).float().mean(0)
    p = model.frequency_F
    assert ((rate - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()
    free = model.parent_F < 0
    ratio = model.frequency_F[free][:-1] / model.frequency_F[free][1:]
    assert (ratio >= 1 - 1e-6).all()  # power law: lower index, more frequent


def test_children_need_parents_and_exclude_siblings():
    model = toy_model(ToyConfig(run="x", n_features=200, d=32, hierarchy_fraction=0.8, children_per_parent=3,
                                hierarchy_depth=2, l0=8.0))
    parent = model.parent_F
    children = torch.nonzero(parent >= 0).flatten()
    assert len(children) > 50
    fired = _fired(model, 20_000)
    assert not (fired[:, children] & ~fired[:, parent[children]]).any()
    for p in torch.unique(parent[children]).tolist():
        assert (fired[:, parent == p].sum(1) <= 1).all()
    assert fired[:, children].any(0).float().mean() > 0.9  # the children do fire


def test_alone_fires_at_most_one_free_feature_per_row_at_its_marginal():
    model = toy_model(ToyConfig(run="x", n_features=60, d=16, l0=1.1, alone=True, correlation=0.0,
                                hierarchy_fraction=0.4, children_per_parent=2, hierarchy_depth=1))
    free = model.parent_F < 0
    assert float(model.own_F[free].sum()) <= 1 + 1e-6
    n = 40_000
    fired = _fired(model, n)
    assert (fired[:, free].sum(1) <= 1).all() and fired[:, free].any(1).float().mean() > 0.5
    rate, p = fired.float().mean(0), model.frequency_F
    assert ((rate - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()  # marginals as with the copula
    children = torch.nonzero(~free).flatten()
    assert not (fired[:, children] & ~fired[:, model.parent_F[children]]).any()


def _firing_corr(model, n=30_000):
    f = _fired(model, n).float()
    f = (f - f.mean(0)) / f.std(0).clamp(min=1e-9)
    return f.T @ f / n


def test_correlation_raises_firing_correlation():
    kw = dict(run="x", n_features=32, d=16, hierarchy_fraction=0.0, l0=6.0, frequency_exponent=0.0,
              correlation_rank=2)
    correlated = toy_model(ToyConfig(**kw, correlation=0.8))
    latent = correlated.loadings_FR @ correlated.loadings_FR.T
    off = ~torch.eye(32, dtype=torch.bool)
    pairs = off & (latent > 0.5)
    assert pairs.sum() > 10
    with_corr = _firing_corr(correlated)[pairs].mean()
    without = _firing_corr(toy_model(ToyConfig(**kw, correlation=0.0)))[pairs].mean()
    assert with_corr > 0.2 and abs(without) < 0.03


def test_superposition_zero_is_orthogonal_and_one_is_not():
    ortho = toy_model(ToyConfig(run="x", n_features=20, d=32, superposition=0.0, l0=2.0)).features_FD
    torch.testing.assert_close(ortho @ ortho.T, torch.eye(20), atol=1e-5, rtol=0)
    rand = toy_model(ToyConfig(run="x", n_features=20, d=32, superposition=1.0, l0=2.0)).features_FD
    assert (rand @ rand.T - torch.eye(20)).abs().max() > 0.2
    crowded = toy_model(ToyConfig(run="x", n_features=48, d=16, superposition=0.0, l0=2.0)).features_FD
    crowded_rand = toy_model(ToyConfig(run="x", n_features=48, d=16, superposition=1.0, l0=2.0)).features_FD

    def overlap(f):
        return float(((f @ f.T).fill_diagonal_(0) ** 2).sum())

    assert overlap(crowded) < 0.8 * overlap(crowded_rand)


def test_noise_adds_its_variance():
    kw = dict(run="x", n_features=64, d=16)
    clean = toy_model(ToyConfig(**kw, noise=0.0)).sample(20_000, torch.Generator().manual_seed(3))[0]
    noisy = toy_model(ToyConfig(**kw, noise=0.5)).sample(20_000, torch.Generator().manual_seed(3))[0]
    extra = float(noisy.var(0).mean() - clean.var(0).mean())
    assert abs(extra - 0.25) < 0.02


def test_magnitudes_and_returned_codes_rebuild_x():
    model = toy_model(ToyConfig(run="x", n_features=64, d=16, noise=0.0, magnitude_mean=2.0, magnitude_std=0.1))
    x, idx, val = model.sample(500, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and val.dtype == torch.float32 and x.dtype == torch.float32
    assert ((val > 0) == (idx >= 0)).all() and abs(float(val[idx >= 0].mean()) - 2.0) < 0.02
    codes = torch.zeros(500, 65).scatter_(1, idx % 65, val)[:, :64]
    torch.testing.assert_close(codes @ model.features_FD, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, words", [
    (dict(n_features=0), "n_features must be >= 1, got 0"),
    (dict(n_features=8, l0=9.0), "l0 must be in (0, n_features=8], got 9.0"),
    (dict(noise=-0.1), "noise must be >= 0, got -0.1"),
    (dict(correlation=1.0), "correlation must be in [0, 1), got 1.0"),
    (dict(alone=True, correlation=0.2), "correlation must be 0 with --alone"),
    (dict(alone=True, correlation=0.0, l0=3.0), "one draw per row needs at most 1; lower l0"),
])
def test_bad_options_say_what_is_valid(bad, words):
    with pytest.raises(ValueError) as e:
        toy_model(ToyConfig(run="x", **bad))
    assert words in str(e.value)


def test_resumed_toy_equals_uninterrupted(tmp_path, monkeypatch):
    import saex.store.writer as writer

    real, calls = writer.StoreWriter.flush, []

    def die_after_first(self):
        real(self)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(writer.StoreWriter, "flush", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        toy(ToyConfig(run=str(tmp_path / "a"), **SMALL))
    assert json.loads((tmp_path / "a" / "acts" / "manifest.json").read_text())["rows"] == 1000
    monkeypatch.setattr(writer.StoreWriter, "flush", real)
    toy(ToyConfig(run=str(tmp_path / "a"), **SMALL))
    toy(ToyConfig(run=str(tmp_path / "b"), **SMALL))
    a = json.loads((tmp_path / "a" / "acts" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "acts" / "manifest.json").read_text())
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and a["rows"] == 3000


def test_saex_toy_then_train(tmp_path, capsys):
    run = str(tmp_path)
    assert main(["toy", "--run", run, "--n-features", "32", "--d", "8", "--rows", "4096", "--l0", "3"]) == 0
    assert main(["train", "--run", run, "--architecture", "topk", "--k", "3", "--d-sae", "32", "--steps", "20",
                 "--batch-size", "256"]) == 0
    assert any((tmp_path / "saes").iterdir())
    assert main(["toy", "--run", run, "--noise", "-1"]) == 2
    assert "noise must be >= 0, got -1.0" in capsys.readouterr().err


def test_a_toy_run_indexes_and_explores_without_a_model(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from saex.explorer.app import create_app

    run = str(tmp_path)
    assert main(["toy", "--run", run, "--n-features", "32", "--d", "8", "--rows", "4096", "--l0", "3"]) == 0
    assert main(["train", "--run", run, "--architecture", "topk", "--k", "3", "--d-sae", "32", "--steps", "20",
                 "--batch-size", "256"]) == 0
    assert main(["index", "--run", run, "--top", "8", "--samples", "4"]) == 0
    assert "ablation skipped: a toy store has no model" in capsys.readouterr().err
    client = TestClient(create_app(run), raise_server_exceptions=False)
    feature = next(j for j in range(32) if client.get(f"/api/feature/{j}").json()["density"] > 0)
    assert client.get(f"/feature/{feature}").status_code == 200 and client.get("/example/5").status_code == 200
    edit = client.get("/api/edit?example=5&edits=[]")  # experiments need a model: said at once, no hub request
    assert edit.status_code == 503 and "toy store" in edit.json()["detail"]
