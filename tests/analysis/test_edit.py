"""The edit mechanism against independent expectations: a no-op edit is the clean model for every
family, an added direction moves the activation by exactly alpha d_f, each op changes only what it names."""

import json

import pytest
import torch
from PIL import Image

from saex.analysis.edit import Edit, edit_code, edits_json, load_edits, parse_edits, splice_edit
from saex.models import load_model
from saex.models.heads import head_kind, prompt_features, readout
from saex.sae import SAE, SAEConfig


def _sae(d_in, d_sae=32, arch="relu"):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=4))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)  # most latents fire: an edit has something to change
    return sae.eval()


def _inputs(adapter):
    if adapter.modality == "image":
        g = torch.Generator().manual_seed(1)
        pixels = (torch.rand(2, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        return [Image.fromarray(p) for p in pixels]
    return ["the cat sat on the mat", "a short sentence about physics and stars"]


@pytest.mark.parametrize("family, tokens", [("vit", "all"), ("clip", "patches"), ("gpt2", "content"),
                                            ("bert", "content"), ("fmnist-vit", "cls")])
def test_a_noop_edit_is_the_clean_model(family, tokens, tiny_model_dir):
    adapter = load_model("fmnist-vit" if family == "fmnist-vit" else str(tiny_model_dir[family]))
    kind = head_kind(adapter)
    assert kind == {"vit": "classifier", "clip": "zero_shot", "gpt2": "next_token", "bert": "embedding",
                    "fmnist-vit": "classifier"}[family]
    prompts = prompt_features(adapter, ["cat", "dog", "car"]) if kind == "zero_shot" else None
    if family == "fmnist-vit":
        inputs = [Image.fromarray((torch.rand(28, 28) * 255).to(torch.uint8).numpy(), "L") for _ in range(2)]
    else:
        inputs = _inputs(adapter)
    batch = adapter.prepare(inputs)
    point = adapter.hook("blocks.1.hook_resid_post")
    n_tokens = adapter.capture(batch, [point])[point.name].shape[1]
    mask = adapter.select(batch, n_tokens, tokens)
    sae = _sae(adapter.d_model)
    positions = torch.arange(n_tokens).expand(len(inputs), -1)
    run = lambda: readout(adapter, batch, kind, prompts)  # noqa: E731
    clean = run()
    noop = adapter.run_edited(run, point, splice_edit(sae, mask, positions, []))
    through = adapter.run_edited(run, point, lambda a: sae(a.float()).to(a.dtype))  # the SAE alone: not clean
    for key in clean:
        torch.testing.assert_close(noop[key], clean[key], atol=1e-5, rtol=0)
    assert any((through[k] - clean[k]).abs().max() > 1e-4 for k in clean)  # so the check above can fail
    edited = adapter.run_edited(run, point, splice_edit(sae, mask, positions, [Edit("add", [3], 5.0)]))
    assert any((edited[k] - clean[k]).abs().max() > 1e-4 for k in clean)


def test_add_moves_the_activation_by_exactly_alpha_times_the_decoder_row():
    sae = _sae(8)
    a = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    positions = torch.arange(5).expand(2, -1)
    out = splice_edit(sae, mask, positions, [Edit("add", [7], 2.5)])(a)
    want = a.clone()
    want[mask] += 2.5 * sae.W_dec[7]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    only = splice_edit(sae, mask, positions, [Edit("add", [7], 2.5, positions=[2])])(a)
    want = a.clone()
    want[:, 2] += 2.5 * sae.W_dec[7]
    torch.testing.assert_close(only, want, atol=1e-6, rtol=0)
    per_row = splice_edit(sae, mask, positions, [[Edit("add", [1], 1.0)], []])(a)
    assert torch.equal(per_row[1], a[1]) and not torch.equal(per_row[0], a[0])


def test_each_op_changes_what_it_names():
    f = torch.tensor([[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 4.0]])
    pos = torch.tensor([1, 2])
    src = {"b": torch.tensor([0.0, 5.0, 6.0, 0.0]), "a1": torch.tensor([1.0, 1.0, 0.0, 0.0]),
           "tb": torch.tensor([[7.0, 0.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0]])}
    cases = {
        "clamp": ([Edit("clamp", [2], 9.0)], [[0, 2, 9, 1], [3, 0, 9, 4]]),
        "scale": ([Edit("scale", [3], 0.5)], [[0, 2, 0, 0.5], [3, 0, 0, 2]]),
        "zero": ([Edit("zero", [0, 3])], [[0, 2, 0, 0], [0, 0, 0, 0]]),
        "add at position 2": ([Edit("add", [1], 1.0, positions=[2])], [[0, 2, 0, 1], [3, 1, 0, 4]]),
        # copy: what b has where the input lacks it (token 1 has feature 1 already, token 2 lacks it)
        "copy": ([Edit("copy", source="b")], [[0, 2, 6, 1], [3, 5, 6, 4]]),
        "copy named": ([Edit("copy", [1], source="b")], [[0, 5, 0, 1], [3, 5, 0, 4]]),
        # a source with as many tokens as the input is copied token by token
        "copy per token": ([Edit("copy", source="tb")], [[7, 2, 0, 1], [3, 0, 8, 4]]),
        "pair": ([Edit("pair", source="a1", target="b")], [[-1, 6, 6, 1], [2, 4, 6, 4]]),
        "stacked": ([Edit("zero", [1]), Edit("clamp", [1], 7.0, positions=[1])], [[0, 7, 0, 1], [3, 0, 0, 4]]),
    }
    for name, (edits, want) in cases.items():
        assert edit_code(f, pos, edits, src).tolist() == want, name
    assert f.tolist() == [[0.0, 2.0, 0.0, 1.0], [3.0, 0.0, 0.0, 4.0]]  # the input code is left alone


def test_edit_files_round_trip_and_bad_edits_are_named(tmp_path):
    edits = [Edit("clamp", [3], 10.0), Edit("copy", source="12"), Edit("add", [1, 2], -2.0, positions=[0])]
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(edits_json(edits)))
    assert load_edits(path, 16) == edits
    bad = [([{"op": "steer", "features": [1]}], "unknown edit op 'steer'; valid: clamp, scale, add, zero, copy, pair"),
           ([{"op": "zero", "features": [16]}], r"features \[16\] are not latents of this SAE \(valid: 0..15\)"),
           ([{"op": "zero"}], "zero needs features"), ([{"op": "pair", "source": "1"}], "pair needs source and target"),
           ([{"op": "clamp", "features": [1], "value": "big"}], "must be a finite number"),
           ([{"op": "zero", "features": [1], "strength": 2}], r"unknown fields \['strength'\]"),
           ({"op": "zero"}, "must be a JSON list")]
    for items, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_edits(items, 16)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_edits(tmp_path / "broken.json", 16)
    for positions in ([9], [0, 9]):  # every named position must be a selected token
        with pytest.raises(ValueError, match=r"positions \[9\] hold none of the selected tokens"):
            edit_code(torch.zeros(1, 4), torch.tensor([0]), [Edit("zero", [1], positions=positions)])
    for bad in ("1", [], [-1], [True]):
        with pytest.raises(ValueError, match="must be a non-empty list of token positions"):
            parse_edits([{"op": "zero", "features": [1], "positions": bad}], 16)
    with pytest.raises(ValueError, match="must be a finite number"):
        parse_edits(json.loads('[{"op": "add", "features": [1], "value": Infinity}]'), 16)


def test_nearest_examples_ranks_examples_by_their_best_row(tmp_path):
    from saex.analysis.retrieval import nearest_examples
    from saex.store import ActivationStore, StoreWriter

    # example 0 holds five rows near the query, examples 1..3 one row each, less near; chunks split them
    q = torch.tensor([1.0, 0.0, 0.0])
    rows = torch.tensor([[1, 0.01 * i, 0] for i in range(5)] + [[1, 0.5, 0], [1, 0.8, 0], [0, 1, 0]])
    examples = torch.tensor([0, 0, 0, 0, 0, 1, 2, 3])
    w = StoreWriter(tmp_path, {"model": "m"}, shard_rows=4)
    for lo in range(0, 8, 2):
        w.add({"acts.h": rows[lo:lo + 2].to(torch.bfloat16), "example": examples[lo:lo + 2]}, ["x"])
    w.finish()
    store = ActivationStore(tmp_path)
    got = nearest_examples(store, "acts.h", q[None], k=3, chunk=3)[0]
    assert [g["example"] for g in got] == [0, 1, 2]  # one entry per example, the best row's cosine
    assert got[0]["cosine"] == pytest.approx(1.0, abs=1e-3)
    assert [g["example"] for g in nearest_examples(store, "acts.h", q[None], k=3, exclude={0}, chunk=3)[0]] == [1, 2, 3]
