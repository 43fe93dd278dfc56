"""The index's ablation pass against independent expectations: a forward hook written here that replaces
the hooked activation by x - f_j W_dec[j] (not the edit mechanism), a feature whose decoder row is zero,
and, on trained SAEs, a feature's own ablation against a random active feature's on the same examples."""

import json
import math
import random
import sqlite3

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from saex.analysis.ablation import NoReadout, ablate_features
from saex.analysis.edit import Edit, splice_edit
from saex.data import reopen
from saex.data.base import Example
from saex.models import load_model
from saex.models.heads import head_kind, prompt_features, readout
from saex.sae import SAE, SAEConfig
from saex.sae.io import load_sae
from saex.store import ActivationStore

HOOK = "blocks.1.hook_resid_post"


class ListDataset:
    def __init__(self, inputs, labels):
        self.items = [Example(i, str(i), x, y) for i, (x, y) in enumerate(zip(inputs, labels))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _random_sae(d_in, d_sae=16):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu"))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # most latents fire, so that zeroing one changes something
        sae.W_dec.mul_(4)
    return sae.eval()


def _inputs(family, n=5):
    g = torch.Generator().manual_seed(1)
    if family in ("gpt2", "bert"):
        return ["the cat sat on the mat", "a short sentence about physics and stars", "rivers run to the sea",
                "one two three four five six", "music, art and the history of painting"][:n]
    pixels = (torch.rand(n, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


@torch.inference_mode()
def _hand(adapter, sae, point, tokens, batch, j, kind, prompts, label):
    """(probabilities or embedding, loss) of one example, clean and with feature j zeroed by a hook written
    here on the block's output: x - f_j(x) W_dec[j] at the selected tokens."""
    def zero_j(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        mask = adapter.select(batch, h.shape[1], tokens).to(h.device)
        x = h[mask].float()
        f = sae.encode(x).dense()[:, j]
        h = h.clone()
        h[mask] = (x - f[:, None] * sae.W_dec[j].float()).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    results = []
    for ablate in (False, True):
        handle = adapter.blocks[point.layer].register_forward_hook(zero_j) if ablate else None
        try:
            inputs = adapter.on_device(batch).inputs
            if kind == "next_token":
                logits = adapter.model(**inputs).logits[0].float()
                ids = inputs["input_ids"][0]
                results.append((logits[-1].softmax(-1), F.cross_entropy(logits[:-1], ids[1:])))
            elif kind == "embedding":
                results.append((readout(adapter, batch, kind)["embedding"][0], None))
            else:
                logits = (adapter.model(**inputs).logits if kind == "classifier"
                          else readout(adapter, batch, kind, prompts)["logits"])[0].float()
                results.append((logits.softmax(-1), F.cross_entropy(logits, torch.tensor(label))))
        finally:
            if handle is not None:
                handle.remove()
    return results


def _expected(adapter, sae, point, tokens, dataset, examples, j, kind, prompts):
    """Mean change of each output's probability, mean KL and mean loss change over `examples`."""
    deltas, kls, losses = [], [], []
    for e in examples:
        item = dataset[e]
        (p, loss_p), (q, loss_q) = _hand(adapter, sae, point, tokens, adapter.prepare([item.input]), j, kind,
                                         prompts, item.label)
        if kind == "embedding":
            losses.append(float(1 - F.cosine_similarity(p, q, dim=0)))
            continue
        deltas.append(q - p)
        kls.append(float((p * (p.log() - q.log())).sum()))
        losses.append(float(loss_q - loss_p))
    mean = torch.stack(deltas).mean(0) if deltas else None
    return mean, (sum(kls) / len(kls) if kls else None), sum(losses) / len(losses)


def _check(got, mean, kl, loss, names):
    assert got.loss_delta == pytest.approx(loss, abs=1e-5)
    if mean is None:
        assert got.kl is None and got.outputs == [] and got.loses is None and got.gains is None
        return
    assert got.kl == pytest.approx(kl, abs=1e-5)
    for extreme, want in ((got.loses, float(mean.min())), (got.gains, float(mean.max()))):
        assert abs(want) < 1e-6 if extreme is None else extreme[1] == pytest.approx(want, abs=1e-5)  # None: none moves
    if len(mean) <= 100:  # every output, by name
        assert [n for n, _ in got.outputs] == names
        torch.testing.assert_close(torch.tensor([d for _, d in got.outputs]), mean, atol=1e-5, rtol=0)
        assert got.loses is None or got.loses[0] == names[int(mean.argmin())]
        assert got.gains is None or got.gains[0] == names[int(mean.argmax())]
    else:  # a vocabulary: the 10 that drop most and the 10 that rise most
        assert len(got.outputs) == 20
        deltas, want = sorted(d for _, d in got.outputs), mean.sort().values
        assert deltas[:10] == pytest.approx(want[:10].tolist(), abs=1e-5)
        assert deltas[10:] == pytest.approx(want[-10:].tolist(), abs=1e-5)


@pytest.mark.parametrize("family, tokens", [("vit", "patches"), ("clip", "cls"), ("gpt2", "content"),
                                            ("bert", "content")])
def test_ablation_equals_a_hand_written_hook(family, tokens, tiny_model_dir):
    adapter = load_model(str(tiny_model_dir[family]))
    kind = head_kind(adapter)
    label_names = ["cat", "dog", "car"] if kind == "zero_shot" else None
    labels = [0, 4, 2, 1, 3] if kind == "classifier" else [0, 2, 1, 1, 0] if kind == "zero_shot" else [-1] * 5
    dataset = ListDataset(_inputs(family), labels)
    sae = _random_sae(adapter.d_model)
    with torch.no_grad():
        sae.b_enc[[1, 5, 9]] = 1.0  # the ablated features fire on every example, so each ablation moves something
    point = adapter.hook(HOOK)
    # features 1, 5 and 9 on 3, 2 and 4 examples (-1: no more top examples); feature 0 has none
    example_SK = torch.full((sae.d_sae, 5), -1)
    example_SK[1, :3] = torch.tensor([2, 0, 4])
    example_SK[5, :2] = torch.tensor([1, 3])
    example_SK[9] = torch.tensor([4, 3, 2, 1, 0])
    # batch_rows 4 splits examples and features across forward passes
    result = ablate_features(adapter, sae, point, tokens, dataset, example_SK, examples=4, label_names=label_names,
                             batch_rows=4, show_progress=False)
    assert result.readout == kind and result.examples_per_feature == 4 and result.seconds > 0
    assert [f.feature for f in result.features] == [1, 5, 9] and [f.examples for f in result.features] == [3, 2, 4]
    assert all(abs(f.kl if f.kl is not None else f.loss_delta) > 1e-7 for f in result.features)  # each moves
    prompts = prompt_features(adapter, label_names) if kind == "zero_shot" else None
    names = label_names if kind == "zero_shot" else \
        [adapter.model.config.id2label[i] for i in range(5)] if kind == "classifier" else None
    for got, row in zip(result.features, ([2, 0, 4], [1, 3], [4, 3, 2, 1])):
        mean, kl, loss = _expected(adapter, sae, point, tokens, dataset, row, got.feature, kind, prompts)
        _check(got, mean, kl, loss, names)


def test_row_effects_average_to_the_mean_effect():
    from saex.analysis.ablation import row_effect
    from saex.analysis.effect import mean_effect

    clean, ablated = torch.randn(6, 10) * 3, torch.randn(6, 10) * 3
    delta_PC, kl_P = row_effect(clean, ablated)
    want = mean_effect(clean, ablated)
    torch.testing.assert_close(delta_PC.mean(0), want["delta_C"])
    torch.testing.assert_close(kl_P.mean(), want["kl"])


@pytest.mark.parametrize("by_example", [True, False])
@pytest.mark.parametrize("batch_rows", [2, 3, 7, 256])
def test_chunks_hold_every_pair_once_within_the_row_budget(by_example, batch_rows):
    from saex.analysis.ablation import _chunks

    rng = random.Random(batch_rows)
    todo = {j: rng.sample(range(12), rng.randint(1, 9)) for j in range(0, 40, 3)}  # examples shared by features
    seen = []
    for chunk in _chunks(todo, by_example, batch_rows):
        examples = [e for e, _ in chunk]
        assert len(set(examples)) == len(examples)  # one clean row per example
        assert len(chunk) + sum(len(fs) for _, fs in chunk) <= batch_rows
        seen += [(j, e) for e, fs in chunk for j in fs]
    assert sorted(seen) == sorted((j, e) for j, exs in todo.items() for e in exs)


def test_a_dead_weight_feature_has_no_effect_and_a_live_one_does(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["vit"]))
    sae = _random_sae(adapter.d_model)
    with torch.no_grad():
        sae.W_dec[3] = 0  # it still fires, but writes nothing into the residual stream
        sae.W_dec[7] *= 10  # a random tiny model's outputs are near uniform: make the live feature's effect plain
    dataset = ListDataset(_inputs("vit"), [0, 1, 2, 3, 4])
    example_SK = torch.full((sae.d_sae, 5), -1)
    example_SK[3] = example_SK[7] = torch.arange(5)
    point = adapter.hook(HOOK)
    acts = adapter.capture(adapter.prepare(_inputs("vit")), [point])[point.name][:, 1:]
    assert bool((sae.encode(acts.reshape(-1, adapter.d_model)).dense()[:, 3] > 0).any())  # zeroing it changes the code
    dead, live = ablate_features(adapter, sae, point, "patches", dataset, example_SK, examples=5,
                                 show_progress=False).features
    print(f"dead: kl {dead.kl:.3g}, live: kl {live.kl:.3g}")
    assert dead.feature == 3 and dead.kl < 1e-9 and abs(dead.loss_delta) < 1e-7
    assert max(abs(d) for _, d in dead.outputs) < 1e-7
    assert live.kl > 1e-6 and max(abs(d) for _, d in live.outputs) > 1e-5


def test_a_model_without_a_readout_is_refused_by_name(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["dinov2"]))
    example_SK = torch.zeros(16, 1, dtype=torch.long)
    with pytest.raises(NoReadout, match="has no readout"):
        ablate_features(adapter, _random_sae(adapter.d_model), adapter.hook(HOOK), "cls",
                        ListDataset(_inputs("dinov2", 1), [0]), example_SK, show_progress=False)


@torch.inference_mode()
def own_vs_random(run, sae_name: str, min_examples: int = 8, seed: int = 0) -> dict:
    """For each feature with >= min_examples ablated top examples and a top label (the label its top
    examples mostly have): the mean drop of that label's probability ("prob") and log-probability
    ("logprob") over those examples when the feature itself is zeroed on them ("own"), and when on each
    example a random other feature active there is zeroed ("random"), both with the edit mechanism here;
    "stored_gap": the largest difference between the own probability drops and the index's table."""
    db = sqlite3.connect(run / "index" / sae_name / "index.sqlite")
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    features = {}  # feature -> (top label, its ablated examples, the stored mean change of the label's probability)
    for j, n, label in db.execute("SELECT a.feature, a.examples, f.top_label FROM ablation a JOIN features f "
                                  "ON f.id = a.feature WHERE a.examples >= ? AND f.top_label >= 0", (min_examples,)):
        stored = db.execute("SELECT delta FROM ablation_outputs WHERE feature = ? AND name = ?",
                            (j, meta["label_names"][label])).fetchone()[0]
        examples = [e for (e,) in db.execute("SELECT example FROM feature_examples WHERE feature = ? AND kind = 'top' "
                                             "AND rank < ? ORDER BY rank", (j, n))]
        features[j] = (label, examples, stored)
    store = ActivationStore(run / "acts")
    sae = load_sae(run / "saes" / sae_name)
    cols = next(store.iter_ordered([store.acts(), "example"], len(store)))
    code = sae.encode(cols[store.acts()].float())
    active = {}  # example -> latents active on any of its tokens
    for ex, idx, val in zip(cols["example"].tolist(), code.indices_BK.tolist(), code.values_BK.tolist()):
        active.setdefault(ex, set()).update(i for i, v in zip(idx, val) if v > 0)
    rng = random.Random(seed)
    pairs = [(j, e, rng.choice(sorted(active[e] - {j}))) for j, (_, exs, _) in features.items() for e in exs]
    adapter = load_model(meta["model"])
    dataset = reopen(store.manifest["dataset"])
    point = adapter.hook(meta["hook"])
    def log_probs(examples, ablated=None):
        batch = adapter.prepare([dataset[e].input for e in examples])
        run_head = lambda: readout(adapter, batch, "classifier")["logits"].log_softmax(-1)  # noqa: E731
        if ablated is None:
            return run_head()
        mask = adapter.select(batch, n_tokens, meta["tokens"])
        positions = torch.arange(n_tokens).expand(len(examples), -1)
        return adapter.run_edited(run_head, point, splice_edit(sae, mask, positions,
                                                               [[Edit("zero", [f])] for f in ablated]))

    n_tokens = adapter.capture(adapter.prepare([dataset[pairs[0][1]].input]), [point])[point.name].shape[1]
    unique = sorted({e for _, e, _ in pairs})
    clean = dict(zip(unique, torch.cat([log_probs(unique[s:s + 256]) for s in range(0, len(unique), 256)])))
    drops = {}  # feature -> per example: (own prob, random prob, own logprob, random logprob) drops
    for s in range(0, len(pairs), 256):
        chunk = pairs[s:s + 256]
        examples = [e for _, e, _ in chunk]
        own, rand = log_probs(examples, [j for j, _, _ in chunk]), log_probs(examples, [r for _, _, r in chunk])
        for b, (j, e, _) in enumerate(chunk):
            c, p = features[j][0], clean[e]
            drops.setdefault(j, []).append([float(p[c].exp() - own[b, c].exp()), float(p[c].exp() - rand[b, c].exp()),
                                            float(p[c] - own[b, c]), float(p[c] - rand[b, c])])
    order = sorted(features)
    mean_FV = torch.tensor([[sum(v) / len(v) for v in zip(*drops[j])] for j in order])
    stored_gap = float((mean_FV[:, 0] + torch.tensor([features[j][2] for j in order])).abs().max())
    return {"prob": (mean_FV[:, 0], mean_FV[:, 1]), "logprob": (mean_FV[:, 2], mean_FV[:, 3]),
            "stored_gap": stored_gap}


def sign_test(own_F, random_F) -> tuple[int, int, float]:
    """Features where the own ablation drops the label more, of those that differ, and the one-sided p."""
    wins, n = int((own_F > random_F).sum()), int((own_F != random_F).sum())
    return wins, n, sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n


def describe(result: dict) -> str:
    lines = []
    for measure in ("prob", "logprob"):
        own, rand = result[measure]
        d = own - rand
        wins, n, p = sign_test(own, rand)
        lines.append(f"{measure} drop over {len(own)} features: own {own.mean():.5f}, random {rand.mean():.5f}, "
                     f"difference {d.mean():.5f} (standard error {d.std() / len(d) ** 0.5:.5f}); own larger on "
                     f"{wins}/{n}, sign test p {p:.2g}")
    return "\n".join(lines + [f"own drops vs the stored table: max gap {result['stored_gap']:.2g}"])


@pytest.mark.slow
def test_on_the_demo_own_ablation_beats_a_random_active_feature(tmp_path_factory):
    """The label's log-probability, not its probability: on the examples of their label the model is near
    certain (p ~ 1), so differences of probabilities are those of the few unsure examples; the drop of the
    log-probability is the factor by which the probability falls, on every example alike."""
    from saex.cli import main

    run = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--no-serve", "--run", str(run)]) == 0
    result = own_vs_random(run, "topk")
    print(describe(result))
    own, rand = result["logprob"]
    assert len(own) >= 500 and result["stored_gap"] < 1e-5
    assert sign_test(own, rand)[2] < 0.01 and float(own.mean() - rand.mean()) > 0
