"""saex eval end to end on real and tiny models of each downstream head."""

import json

import pytest
import torch

from saex.cli import main


def _pipeline(run, model, dataset, hook, tokens, extra_train=()):
    assert main(["harvest", "--run", str(run), "--model", model, "--dataset", dataset, "--hook", hook,
                 "--tokens", tokens, "--max-examples", "64", "--batch-size", "16"]) == 0
    assert main(["train", "--run", str(run), "--architecture", "topk", "--k", "8", "--expansion", "2",
                 "--steps", "20", "--batch-size", "32", *extra_train]) == 0
    assert main(["eval", "--run", str(run), "--examples", "16", "--batch-size", "8"]) == 0
    return json.loads((run / "eval" / "metrics.json").read_text())


def test_fmnist_vit_classifier_head(tmp_path):
    m = _pipeline(tmp_path, "fmnist-vit", "fashion-mnist", "blocks.2.hook_resid_post", "cls")["topk"]
    d = m["downstream"]
    assert d["head"] == "classifier" and m["examples"] == 16 and m["l0"] == pytest.approx(8.0)
    assert d["loss_zero"] > d["loss_clean"] and 0 <= d["accuracy_clean"] <= 1


@pytest.mark.parametrize("family, head, dataset, tokens", [
    ("gpt2", "next_token", "wiki", "content"), ("bert", "embedding", "wiki", "content"),
    ("clip", "zero_shot", "fashion-mnist", "cls"),
])
def test_tiny_model_heads(family, head, dataset, tokens, tiny_model_dir, tmp_path):
    m = _pipeline(tmp_path, str(tiny_model_dir[family]), dataset, "blocks.1.hook_resid_post", tokens)["topk"]
    d = m["downstream"]
    assert d["head"] == head
    assert all(torch.isfinite(torch.tensor(d[k])) for k in ("loss_clean", "loss_sae", "loss_zero"))


def test_eval_of_a_sweep_draws_the_pareto_plot(tmp_path):
    run = tmp_path
    assert main(["harvest", "--run", str(run), "--model", "fmnist-vit", "--dataset", "fashion-mnist",
                 "--max-examples", "64", "--hook", "blocks.1.hook_resid_post"]) == 0
    assert main(["train", "--run", str(run), "--sweep", "k=2,8", "--expansion", "2", "--steps", "10",
                 "--batch-size", "32"]) == 0
    assert main(["eval", "--run", str(run), "--examples", "8", "--no-downstream"]) == 0
    assert (run / "eval" / "pareto.png").stat().st_size > 1000 and (run / "eval" / "pareto.svg").exists()
    saved = json.loads((run / "saes" / "topk-k2" / "metrics.json").read_text())
    assert len(saved["density"]) == 256 and "downstream" not in saved
    assert (run / "saes" / "topk-k2" / "density.png").stat().st_size > 1000


def test_identity_edit_leaves_outputs_unchanged(tiny_model_dir):
    from saex.models import load_model
    from saex.models.heads import head_output

    adapter = load_model(str(tiny_model_dir["gpt2"]))
    batch = adapter.prepare(["one two three", "four"])
    run = lambda: head_output(adapter, batch, "next_token")  # noqa: E731
    clean = run()
    hook = adapter.hook("blocks.1.hook_resid_pre")
    assert torch.equal(adapter.run_edited(run, hook, lambda a: a.clone()), clean)
    assert not torch.equal(adapter.run_edited(run, hook, lambda a: torch.zeros_like(a)), clean)
