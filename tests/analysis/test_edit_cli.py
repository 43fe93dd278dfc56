"""`saex edit` against the API it drives: its effect.json is Experiment.effect's for the edits its flags
name, inline flags and an edit file agree, --save-edits round-trips, bad input is one line (exit 2) and
writes nothing, and the figure is a PNG."""

import json
import re

import pytest
import torch
from PIL import Image

from saex.analysis.edit import Edit, parse_edits
from saex.analysis.experiment import Experiment
from saex.analysis.figures import effect_png
from saex.cli import main
from tests.conftest import build_run


def _build(run, model, dataset, tokens, hook, n):
    """The explorer tests' runs without the eval and index that edits need not."""
    return Experiment(build_run(run, model, dataset, tokens, hook, n, explore=False), "topk-k8")


@pytest.fixture(scope="module")
def image_exp(image_run):
    return Experiment(image_run, "topk-k8")  # the explorer tests' session run: fmnist-vit, patches


@pytest.fixture(scope="module")
def text_exp(text_run):
    return Experiment(text_run, "topk-k8")  # tiny BERT on wiki, content tokens


def _edit(exp, *args, out=None):
    argv = ["edit", "--run", str(exp.run), "--sae", exp.sae_name, "--neighbours", "4", *args]
    return main(argv + (["--out", str(out)] if out else []))


def _json(path):
    return json.loads(path.read_text())


def _strongest(exp, ref, n=2):
    return [a["feature"] for a in exp.effect(ref, [], neighbours=0)["active_before"][:n]]


def test_the_cli_writes_what_experiment_effect_returns(image_exp, tmp_path, capsys):
    f1, f2 = _strongest(image_exp, "3")
    threads = torch.get_num_threads()
    assert _edit(image_exp, "--example", "3", "--add", f"{f1}=4", "--zero", f"{f2},7", out=tmp_path / "o") == 0
    assert torch.get_num_threads() == threads  # --threads 1 (the default) is the command's alone
    want = image_exp.effect("3", [Edit("add", [f1], 4.0), Edit("zero", [f2, 7])], neighbours=4)
    got = _json(tmp_path / "o" / "effect.json")
    assert got == json.loads(json.dumps(want))
    assert {c["feature"] for c in got["features_changed"]} >= {f1, f2}
    assert _json(tmp_path / "o" / "edits.json") == [{"op": "add", "features": [f1], "value": 4.0},
                                                    {"op": "zero", "features": [f2, 7]}]
    out = capsys.readouterr().out
    effect = got["effect"]
    assert f"top {effect['top_clean']!r} -> {effect['top_edited']!r}; KL(clean || edited) {effect['kl']:.4f}" in out
    assert all(str(n["example"]) in out for n in got["neighbours"]["after"])
    with Image.open(tmp_path / "o" / "effect.png") as im:
        im.verify()
        assert im.format == "PNG"
    assert (tmp_path / "o" / "effect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inline_flags_and_an_edit_file_give_the_same_effect(image_exp, tmp_path):
    f1, f2 = _strongest(image_exp, "5")
    inline = ["--clamp", f"{f1}=0.5", "--clamp", f"{f2},9=1.5", "--scale", f"{f1}=2", "--add", "3=-1",
              "--zero", "4", "--copy-from", "11", "--pair", "12,13", "--features", "1,2", "--positions", "1,2,3"]
    assert _edit(image_exp, "--example", "5", *inline, "--save-edits", str(tmp_path / "saved.json"),
                 out=tmp_path / "a") == 0
    at = {"positions": [1, 2, 3]}
    by_hand = [{"op": "clamp", "features": [f1], "value": 0.5, **at},
               {"op": "clamp", "features": [f2, 9], "value": 1.5, **at},
               {"op": "scale", "features": [f1], "value": 2.0, **at}, {"op": "add", "features": [3], "value": -1.0, **at},
               {"op": "zero", "features": [4], **at}, {"op": "copy", "features": [1, 2], "source": "11", **at},
               {"op": "pair", "features": [1, 2], "source": "12", "target": "13", **at}]
    assert _json(tmp_path / "saved.json") == by_hand
    (tmp_path / "by_hand.json").write_text(json.dumps(by_hand))
    assert _edit(image_exp, "--example", "5", "--edits", str(tmp_path / "by_hand.json"), out=tmp_path / "b") == 0
    assert _edit(image_exp, "--example", "5", "--edits", str(tmp_path / "saved.json"), out=tmp_path / "c") == 0
    a = _json(tmp_path / "a" / "effect.json")
    assert a == _json(tmp_path / "b" / "effect.json") == _json(tmp_path / "c" / "effect.json")
    assert a == json.loads(json.dumps(image_exp.effect("5", parse_edits(by_hand, image_exp.d_sae), neighbours=4)))
    assert a["features_changed"]  # the edits did something, so the equalities above can fail


def test_the_default_folder_is_named_by_the_example_and_the_edits(image_exp):
    base = image_exp.run / "experiments" / "topk-k8"
    assert _edit(image_exp, "--example", "8", "--add", "3=2") == 0
    assert _edit(image_exp, "--example", "8", "--add", "3=2") == 0
    assert _edit(image_exp, "--example", "8", "--add", "3=3") == 0
    folders = sorted(p.name for p in base.iterdir() if p.name.startswith("8-"))
    assert len(folders) == 2 and all(re.fullmatch(r"8-[0-9a-f]{8}", f) for f in folders)
    assert all({p.name for p in (base / f).iterdir()} == {"edits.json", "effect.json", "effect.png"} for f in folders)


def test_an_image_file_is_the_dataset_example_it_holds(image_exp, tmp_path):
    path = tmp_path / "shoe.png"
    image_exp.dataset[21].input.save(path)
    assert _edit(image_exp, "--example", str(path), "--add", "3=2", out=tmp_path / "o") == 0
    from_file = _json(tmp_path / "o" / "effect.json")
    from_index = image_exp.effect("21", [Edit("add", [3], 2.0)], neighbours=0)
    assert from_file["example"] == str(path) and from_file["label"] is None
    for key in ("features_changed", "active_before", "active_after"):
        flat = [[list(row.values()) for row in r[key]] for r in (from_file, from_index)]
        assert [v for row in flat[0] for v in row] == pytest.approx([v for row in flat[1] for v in row], abs=1e-5)
    assert [p["edited"] for p in from_file["effect"]["probs"]] == pytest.approx(
        [p["edited"] for p in from_index["effect"]["probs"]], abs=1e-6)


def _bad_cases(exp, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    boost = tmp_path / "boost.json"
    boost.write_text(json.dumps([{"op": "boost", "features": [1]}]))
    n, d = len(exp.dataset), exp.d_sae
    return [
        (["--example", "1", "--clamp", f"{d}=1"], [f"--clamp '{d}=1'", f"[{d}]", f"valid: 0..{d - 1}"]),
        (["--example", str(n), "--add", "1=1"], ["--example", f"example {n} is outside", f"valid: 0..{n - 1}"]),
        (["--example", str(notes), "--add", "1=1"], [str(notes), "is not an image"]),
        (["--example", "1", "--edits", str(boost)], [str(boost), "'boost'", "valid: clamp, scale, add, zero, copy, pair"]),
        (["--example", "1", "--clamp", "3=x"], ["--clamp '3=x': V must be a number", "'x'"]),
        (["--example", "1", "--add", "3"], ["--add '3'", "F=ALPHA"]),
        (["--example", "1", "--zero", "3,a"], ["--zero '3,a'", "integers"]),
        (["--example", "1", "--copy-from", str(n + 5)], [f"--copy-from '{n + 5}'", f"valid: 0..{n - 1}"]),
        (["--example", "1", "--pair", "4"], ["--pair '4'", "A1,A2"]),
        (["--example", "1", "--add", "1=1", "--positions", "0,999"], ["positions [0, 999]", "selected tokens"]),
        (["--example", "1", "--features", "3"], ["--features 3", "--copy-from or --pair"]),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(image_exp, tmp_path, capsys):
    before = sorted(image_exp.run.rglob("*"))
    for args, needles in _bad_cases(image_exp, tmp_path):
        saved = tmp_path / "saved.json"
        assert _edit(image_exp, *args, "--save-edits", str(saved), out=tmp_path / "out") == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        line = err[-1]
        assert line.startswith("saex edit: error: ") and "Traceback" not in "".join(err), (args, err)
        assert all(n in line for n in needles), (args, line)
        assert not (tmp_path / "out").exists() and not saved.exists(), args
    assert sorted(image_exp.run.rglob("*")) == before


def test_text_the_cli_matches_experiment_and_writes_no_png_for_an_embedding(text_exp, tmp_path, capsys):
    (f1,) = _strongest(text_exp, "2", 1)
    assert _edit(text_exp, "--example", "2", "--add", f"{f1}=6", out=tmp_path / "o") == 0
    got = _json(tmp_path / "o" / "effect.json")
    assert got == json.loads(json.dumps(text_exp.effect("2", [Edit("add", [f1], 6.0)], neighbours=4)))
    assert set(got["effect"]) == {"embedding_cosine"} and got["effect"]["embedding_cosine"] < 1
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"edits.json", "effect.json"}
    assert f"embedding cosine (clean, edited) {got['effect']['embedding_cosine']:.4f}" in capsys.readouterr().out
    txt = tmp_path / "mine.txt"
    txt.write_text(text_exp.dataset[2].input)
    assert _edit(text_exp, "--example", str(txt), "--add", f"{f1}=6", out=tmp_path / "t") == 0
    assert _json(tmp_path / "t" / "effect.json")["effect"] == pytest.approx(got["effect"], abs=1e-5)


def _rounded(v):
    if isinstance(v, float):
        return float(f"{v:.5g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return [_rounded(x) for x in v] if isinstance(v, list) else v


def test_a_causal_lm_gets_its_continuation_and_a_token_figure(tiny_model_dir, tmp_path_factory, capsys):
    exp = _build(tmp_path_factory.mktemp("edit_gpt2"), str(tiny_model_dir["gpt2"]), "wiki", "content",
                 "blocks.1.hook_resid_post", 30)
    out = tmp_path_factory.mktemp("gpt2_out")
    short = out / "short.txt"  # the tiny GPT-2 has 64 positions: room for the prompt and its continuation
    short.write_text("the cat sat on the mat and looked at the")
    assert _edit(exp, "--example", str(short), "--add", "5=8", "--positions", "2,3", out=out / "o") == 0
    got = _json(out / "o" / "effect.json")
    want = exp.effect(str(short), [Edit("add", [5], 8.0, positions=[2, 3])], neighbours=4)
    # the CLI and the API agree up to float32 rounding (their passes may run on other thread counts)
    assert _rounded(got) == _rounded(json.loads(json.dumps(want)))
    assert got["readout"] == "next_token" and got["effect"]["kl"] > 0
    printed = capsys.readouterr().out
    assert f"continuation  clean:  {got['continuation']['clean']!r}" in printed
    assert f"edited: {got['continuation']['edited']!r}" in printed
    assert (out / "o" / "effect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a dataset example filling the context (64 positions here): the continuation keeps the prompt's end
    longest = max(range(30), key=lambda i: len(exp.dataset[i].input))
    got = exp.effect(str(longest), [Edit("add", [5], 8.0)], neighbours=0)
    assert len(exp.adapter.processor(got["continuation"]["edited"])["input_ids"]) >= 1


def test_the_token_figure_is_a_png_and_an_embedding_alone_has_none():
    row = {"name": " the", "clean": 0.2, "edited": 0.5, "delta": 0.3}
    result = {"sae": "s", "hook": "h", "features_changed": [{"feature": 3, "before": 0.0, "after": 2.0}],
              "effect": {"kl": 0.4, "top_clean": " a", "top_edited": " the", "gained": [row],
                         "lost": [{"name": "\n", "clean": 0.4, "edited": 0.1, "delta": -0.3}]}}
    assert effect_png(result)[:8] == b"\x89PNG\r\n\x1a\n"
    assert effect_png({**result, "effect": {"embedding_cosine": 0.9}}) is None


def test_attribute_writes_what_the_attribution_api_returns(image_exp, tmp_path, capsys):
    from saex.analysis.attribution import integrated_gradients

    f = _strongest(image_exp, "5", 1)[0]
    args = ["attribute", "--run", str(image_exp.run), "--sae", image_exp.sae_name, "--example", "5",
            "--feature", str(f), "--out", str(tmp_path / "a")]
    assert main(args) == 0
    got = _json(tmp_path / "a" / "attribution.json")
    inp, _ = image_exp.input_of("5")
    want = integrated_gradients(image_exp.adapter, image_exp.sae, image_exp.point, image_exp.tokens, f,
                                image_exp.adapter.prepare([inp]), steps=64).to_json()
    assert got["completeness"]["relative_error"] < 0.01
    torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor(want["values"]), atol=1e-5, rtol=0)
    assert (tmp_path / "a" / "attribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "completeness: attributions sum to" in capsys.readouterr().out
    assert main(args[:-2] + ["--feature", str(image_exp.d_sae), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_the_commands_method_names_are_the_attribution_modules():
    from saex.analysis import attribution
    from saex.analysis.attribute_command import METHODS

    assert METHODS == attribution.METHODS

