"""saex index against statistics computed directly from the store and the SAE."""

import json
import sqlite3

import pytest
import torch

from saex.cli import main
from saex.explorer.scan import Scan
from saex.sae.io import load_sae
from saex.store import ActivationStore
from tests.crafted import crafted_pickle


def _build(run, model, dataset, tokens, hook, n=200, extra=()):
    assert main(["harvest", "--run", str(run), "--model", model, "--dataset", dataset, "--tokens", tokens,
                 "--hook", hook, "--max-examples", str(n), "--batch-size", "25", "--shard-rows", "60"]) == 0
    assert main(["train", "--run", str(run), "--architecture", "topk", "--k", "4", "--expansion", "2",
                 "--steps", "30", "--batch-size", "64"]) == 0
    assert main(["index", "--run", str(run), "--top", "5", "--samples", "3", "--per-example", "4", *extra]) == 0
    return sqlite3.connect(run / "index" / "topk" / "index.sqlite")


def _direct(run):
    store = ActivationStore(run / "acts")
    sae = load_sae(run / "saes" / "topk")
    cols = next(store.iter_ordered([store.acts(), "example", "label"], len(store)))
    with torch.no_grad():
        f = sae.encode(cols[store.acts()].float()).dense()
    return store, sae, cols, f


@pytest.fixture(scope="module")
def image_index(tmp_path_factory):
    run = tmp_path_factory.mktemp("idx")
    return run, _build(run, "fmnist-vit", "fashion-mnist", "cls", "blocks.2.hook_resid_post")


def test_feature_statistics_match_a_direct_computation(image_index):
    run, db = image_index
    store, sae, cols, f = _direct(run)
    rows = {r[0]: r for r in db.execute("SELECT id, density, mean_act, max_act FROM features")}
    assert len(rows) == sae.d_sae
    fired = (f > 0).float()
    for j in range(sae.d_sae):
        _, density, mean_act, max_act = rows[j]
        assert density == pytest.approx(float(fired[:, j].mean()), abs=1e-6)
        if fired[:, j].any():
            assert mean_act == pytest.approx(float(f[:, j].sum() / fired[:, j].sum()), rel=1e-4)
            assert max_act == pytest.approx(float(f[:, j].max()), rel=1e-5)


def test_top_examples_are_the_strongest(image_index):
    run, db = image_index
    store, sae, cols, f = _direct(run)
    for j in range(0, sae.d_sae, 7):
        got = db.execute("SELECT example, value FROM feature_examples WHERE feature = ? AND kind = 'top' "
                         "ORDER BY rank", (j,)).fetchall()
        expected = f[:, j].topk(5)
        want = [(int(cols["example"][i]), float(v)) for v, i in zip(expected.values, expected.indices) if v > 0]
        assert [e for e, _ in got] == [e for e, _ in want][:len(got)] and len(got) == len(want)
        samples = db.execute("SELECT example, value FROM feature_examples WHERE feature = ? AND kind = 'sample'",
                             (j,)).fetchall()
        firing = {int(cols["example"][i]) for i in (f[:, j] > 0).nonzero().squeeze(1).tolist()}
        assert {e for e, _ in samples} <= firing and len(samples) == min(3, len(firing))


def test_labels_entropy_and_examples(image_index):
    run, db = image_index
    for feature, entropy in db.execute("SELECT id, label_entropy FROM features WHERE density > 0 LIMIT 20"):
        weights = [w for (w,) in db.execute("SELECT weight FROM feature_labels WHERE feature = ?", (feature,))]
        assert sum(weights) == pytest.approx(1.0)
        assert entropy == pytest.approx(-sum(w * __import__("math").log2(w) for w in weights if w > 0), abs=1e-5)
    n, thumbs = db.execute("SELECT COUNT(*), COUNT(thumb) FROM examples").fetchone()
    assert n == 200 and thumbs > 0
    thumb = db.execute("SELECT thumb FROM examples WHERE thumb IS NOT NULL").fetchone()[0]
    assert (run / "index" / "topk" / "thumbs" / thumb).stat().st_size > 50
    meta = dict(db.execute("SELECT key, value FROM meta"))
    assert json.loads(meta["label_names"])[0] == "T-shirt/top" and json.loads(meta["neuron_layer"]) == 2
    assert db.execute("SELECT COUNT(*) FROM features WHERE neuron_max_cos IS NULL").fetchone()[0] == 0


def test_example_top_features(image_index):
    run, db = image_index
    store, sae, cols, f = _direct(run)
    i = 17
    ex = int(cols["example"][i])
    got = db.execute("SELECT feature FROM example_features WHERE example = ? ORDER BY rank", (ex,)).fetchall()
    assert [g for (g,) in got] == f[i].topk(4).indices.tolist()


def test_killed_index_resumes_to_the_same_database(image_index, tmp_path, monkeypatch):
    run, db = image_index
    calls = {"n": 0}
    original = Scan.scan_shard

    def dies_after_two(self, *args):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, *args)

    monkeypatch.setattr(Scan, "scan_shard", dies_after_two)
    assert main(["index", "--run", str(run), "--top", "5", "--samples", "3", "--per-example", "4", "--overwrite"]) == 130
    out = run / "index" / "topk"
    assert (out / "scan.safetensors").exists()
    thumbs = sorted(p.name for p in (out / "thumbs").iterdir())
    # what a SIGKILL while writing the database and the thumbnails leaves behind
    for stale in (".index.sqlite.99999.tmp", ".index.sqlite.99999.tmp-journal", "thumbs/.3.png.x1y2.tmp",
                  "thumbs/123456.png"):
        (out / stale).write_bytes(b"left by a kill")
    monkeypatch.setattr(Scan, "scan_shard", original)
    assert main(["index", "--run", str(run), "--top", "5", "--samples", "3", "--per-example", "4"]) == 0
    # resumed from the saved scan, not rebuilt: the same as the uninterrupted index, and nothing left over
    resumed = sqlite3.connect(out / "index.sqlite")
    for table in ("features", "feature_examples", "example_features", "feature_labels"):
        assert sorted(db.execute(f"SELECT * FROM {table}")) == sorted(resumed.execute(f"SELECT * FROM {table}")), table
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "index.sqlite", "thumbs"]
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == thumbs


def test_a_crafted_pickle_in_place_of_the_scan_state_runs_nothing(image_index, tmp_path):
    run, _ = image_index
    marker = tmp_path / "pwned"
    (run / "index" / "topk").mkdir(parents=True, exist_ok=True)
    (run / "index" / "topk" / "scan.safetensors").write_bytes(crafted_pickle(marker))
    args = ["index", "--run", str(run), "--top", "5", "--samples", "3", "--per-example", "4"]
    assert main(args) == 2
    assert not marker.exists()


def test_text_index_has_token_windows(tmp_path, tiny_model_dir):
    db = _build(tmp_path, str(tiny_model_dir["bert"]), "wiki", "content", "blocks.1.hook_resid_post", n=20)
    feature, value, tokens = db.execute("SELECT feature, value, tokens FROM feature_examples WHERE kind = 'top' "
                                        "AND tokens IS NOT NULL LIMIT 1").fetchone()
    window = json.loads(tokens)
    assert all(isinstance(t, str) for t, _ in window)
    assert " " in "".join(t for t, _ in window) and not any(t.startswith("##") for t, _ in window)
    assert max(a for _, a in window) == pytest.approx(value, rel=1e-3)
    assert db.execute("SELECT COUNT(text) FROM examples").fetchone()[0] == 20


def test_index_asks_which_sae_when_there_are_several(image_run, capsys):
    assert main(["index", "--run", str(image_run)]) == 2
    assert "name one with --sae" in capsys.readouterr().err
    assert main(["index", "--run", str(image_run), "--sae", "nope"]) == 2
    assert "no SAE named ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("positions, grid", [(range(1, 17), (1, 4)), (range(17), (1, 4)), (range(16), (0, 4)),
                                             (range(5, 21), (5, 4)), (range(21), (5, 4)), ([0, 2, 3], None)])
def test_patch_grid_sits_after_the_class_and_register_tokens(positions, grid):
    from saex.explorer.index import _patch_grid

    class Store:  # an example's rows at these token positions: [CLS] 0, registers 1..4, patches 5..20
        def take(self, column, rows):
            return torch.tensor(list(positions))[rows]

    examples = torch.tensor([[0, 0, len(positions), 0]])
    found = _patch_grid(Store(), examples)
    assert (found and (found["offset"], found["side"])) == grid


def test_index_names_nonfinite_rows_of_the_store(image_index, tmp_path, capsys):
    import shutil

    from saex.store import StoreWriter

    run, _ = image_index
    copy = tmp_path / "nan-run"
    shutil.copytree(run / "saes", copy / "saes")
    store = ActivationStore(run / "acts")
    writer = StoreWriter(copy / "acts", {k: v for k, v in store.manifest.items()
                                         if k not in ("format", "columns", "rows", "examples", "complete", "shards",
                                                      "skipped")}, shard_rows=10**9)
    batch = next(store.iter_ordered(list(store.manifest["columns"]), len(store)))
    column = store.acts(store.hooks[0])
    batch[column][7, 0] = float("inf")
    writer.add(batch, [str(i) for i in range(len(store))])
    writer.finish(**{k: store.manifest[k] for k in ("examples_planned",) if k in store.manifest})
    assert main(["index", "--run", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "holds activation rows with NaN or infinity" in err and "shard_000000.safetensors row 7" in err


def test_index_stores_each_features_ablation(image_index):
    run, db = image_index
    meta = dict(db.execute("SELECT key, value FROM meta"))
    assert json.loads(meta["ablation"])["readout"] == "classifier"
    assert json.loads(meta["ablation"])["examples_per_feature"] == 16 and json.loads(meta["ablation"])["seconds"] > 0
    with_top = {j for (j,) in db.execute("SELECT DISTINCT feature FROM feature_examples WHERE kind = 'top'")}
    rows = db.execute("SELECT feature, examples, kl, loss_delta, loses, loses_delta, gains, gains_delta "
                      "FROM ablation").fetchall()
    assert {r[0] for r in rows} == with_top  # every feature with top examples, and only those
    names = json.loads(meta["label_names"])
    for j, n, kl, loss_delta, loses, loses_delta, gains, gains_delta in rows:
        top = db.execute("SELECT COUNT(*) FROM feature_examples WHERE feature = ? AND kind = 'top'", (j,)).fetchone()
        assert n == min(5, top[0]) and kl >= 0 and loss_delta is not None  # --top 5: at most 5 examples
        outputs = dict(db.execute("SELECT name, delta FROM ablation_outputs WHERE feature = ?", (j,)))
        assert sorted(outputs) == sorted(names) and abs(sum(outputs.values())) < 1e-5  # probabilities sum to 1
        assert loses is None or (outputs[loses] == loses_delta == min(outputs.values()) and loses_delta < 0)
        assert gains is None or (outputs[gains] == gains_delta == max(outputs.values()) and gains_delta > 0)


def test_no_ablation_leaves_the_tables_empty(image_index, tmp_path, capsys):
    import shutil

    run, _ = image_index
    copy = tmp_path / "run"
    for folder in ("acts", "saes"):
        shutil.copytree(run / folder, copy / folder)
    args = ["index", "--run", str(copy), "--top", "5", "--samples", "3", "--per-example", "4"]
    assert main([*args, "--ablation-examples", "0"]) == 2
    assert "--ablation-examples must be >= 1, got 0" in capsys.readouterr().err
    assert main([*args, "--no-ablation"]) == 0
    db = sqlite3.connect(copy / "index" / "topk" / "index.sqlite")
    assert db.execute("SELECT COUNT(*) FROM ablation").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM ablation_outputs").fetchone()[0] == 0
    assert "ablation" not in dict(db.execute("SELECT key, value FROM meta"))
    assert db.execute("SELECT COUNT(*) FROM features").fetchone()[0] > 0


def test_own_ablation_drops_the_top_label_more_than_a_random_active_feature(image_run):
    """As the slow demo test in tests/analysis/test_ablation.py (which says why log-probabilities), on the
    fixture's 60-step patch-token SAE: the mean drop over its features."""
    from tests.analysis.test_ablation import describe, own_vs_random

    result = own_vs_random(image_run, "topk-k8")
    print(describe(result))
    own, rand = result["logprob"]
    assert len(own) >= 50 and result["stored_gap"] < 1e-5
    assert float(own.mean() - rand.mean()) > 0
