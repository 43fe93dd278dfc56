"""Transcoders: `saex train --hook X --target Y` learns to reconstruct Y from X's code, with the one loop.

A tiny GPT-2's block-1 MLP is replaced by a known sparse map (a TopK transcoder with fixed random weights,
plus a known linear part for the skip-transcoder), so the truth to recover is known exactly."""

import json

import pytest
import torch

from saex.analysis.ground_truth import cosines, match
from saex.cli import main
from saex.sae import SAE
from saex.sae.config import SAEConfig
from saex.sae.io import load_sae

D, S, K = 32, 48, 3
HOOKS = ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]


class KnownMap(torch.nn.Module):
    """Stands in for the MLP: y = D TopK_k(relu(E x + b)) (+ A x)."""

    def __init__(self, sae: SAE, linear: torch.Tensor | None = None):
        super().__init__()
        self.sae, self.linear = sae, linear

    def forward(self, x):
        y = self.sae(x.float())
        return (y if self.linear is None else y + x.float() @ self.linear.T).to(x.dtype)


def _known(seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D, d_sae=S, architecture="topk", k=K, transcoder=True))
    with torch.no_grad():
        sae.W_enc_SD.copy_(torch.randn(S, D, generator=g))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(S, D, generator=g), dim=1) * 3)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval(), 3 * torch.randn(D, D, generator=g) / D ** 0.5  # a dense part a TopK-3 code cannot hold


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two stores of (mlp_in, mlp_out): the MLP replaced by the sparse map alone, and by the map plus A x."""
    import saex.harvest

    truth, linear = _known()
    real = saex.harvest.load_model
    out = {}
    for name, lin in (("sparse", None), ("skip", linear)):
        run = tmp_path_factory.mktemp(name)

        def patched(*args, lin=lin, **kwargs):
            adapter = real(*args, **kwargs)
            adapter.blocks[1].mlp = KnownMap(truth, lin)
            return adapter

        saex.harvest.load_model = patched
        try:
            assert main(["harvest", "--run", str(run), "--model", str(tiny_model_dir["gpt2"]), "--dataset", "wiki",
                         "--max-examples", "300", "--hook", *HOOKS]) == 0
        finally:
            saex.harvest.load_model = real
        out[name] = run
    return out, truth, linear


def _train(run, *flags):
    assert main(["train", "--run", str(run), "--hook", HOOKS[0], "--target", HOOKS[1], "--architecture", "topk",
                 "--k", str(K), "--d-sae", str(2 * S), "--steps", "1000", "--batch-size", "256", "--lr", "3e-3",
                 *flags]) == 0


def _fvu(sae, run, hook_in=HOOKS[0], hook_out=HOOKS[1]):
    from saex.store import ActivationStore

    store = ActivationStore(run / "acts")
    rows = next(store.iter_ordered([f"acts.{hook_in}", f"acts.{hook_out}"], len(store)))
    x, y = rows[f"acts.{hook_in}"].float(), rows[f"acts.{hook_out}"].float()
    with torch.no_grad():
        y_hat = sae(x)
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def test_a_transcoder_recovers_a_known_sparse_mlp(runs):
    (stores, truth, _) = runs
    run = stores["sparse"]
    _train(run)
    folder = run / "saes" / "topk-transcoder"
    sae = load_sae(folder)
    assert sae.cfg.transcoder and not sae.cfg.skip and sae.d_out == D
    assert sae.metadata["hook"] == HOOKS[0] and sae.metadata["target_hook"] == HOOKS[1]
    # the target is exactly a TopK-3 code of 48 latents: a transcoder of the same k and twice the latents can
    # reach FVU 0; the bf16 store rounds y to 2^-9 relative (FVU ~1e-5), and 1,500 steps leave some error.
    fvu = _fvu(sae, run)
    print(f"transcoder FVU {fvu:.4f}")
    assert fvu < 0.1, fvu
    # and it finds the map's decoder directions: most true rows have a latent within cos 0.9
    cos = cosines(sae.W_dec, truth.W_dec)
    best = cos.abs().max(0).values
    print(f"true decoder rows within cos 0.9: {float((best > 0.9).float().mean()):.2f}")
    assert (best > 0.9).float().mean() > 0.7, best
    assert match(cos)[0].shape == (S,)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_transcoder" and cfg["d_out"] == D and cfg["apply_b_dec_to_input"] is False


def test_a_skip_transcoder_learns_the_linear_part(runs):
    (stores, _, linear) = runs
    run = stores["skip"]
    _train(run, "--skip", "--name", "skip")
    _train(run, "--name", "plain")
    skip, plain = load_sae(run / "saes" / "skip"), load_sae(run / "saes" / "plain")
    assert skip.cfg.skip
    fvu_skip, fvu_plain = _fvu(skip, run), _fvu(plain, run)
    rel = float((skip.W_skip - linear).norm() / linear.norm())
    print(f"skip FVU {fvu_skip:.4f}, plain FVU {fvu_plain:.4f}, W_skip relative error {rel:.3f}")
    assert fvu_skip < 0.5 * fvu_plain, (fvu_skip, fvu_plain)
    assert rel < 0.35, rel  # the skip path carries most of A (the code may hold a little of it)


def test_the_input_scale_folds_into_a_transcoder():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=24, architecture="relu", transcoder=True, d_out=6, skip=True))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.randn(10, 8)
    s, t = 2.5, 0.4  # trained on s x to give t y: after folding, raw x gives raw y
    expected = sae(s * x) / t
    sae.fold_input_scale(s, t)
    torch.testing.assert_close(sae(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flags, words", [
    (["--target", HOOKS[0]], "is the input hook itself"),
    (["--skip"], "--skip adds a skip path to a transcoder"),
    (["--target", "blocks.2.hook_mlp_out"], "blocks.2.hook_mlp_out"),
])
def test_bad_transcoder_flags_are_one_line(runs, flags, words, capsys):
    run = runs[0]["sparse"]
    assert main(["train", "--run", str(run), "--hook", HOOKS[0], "--steps", "2", "--name", "bad", *flags]) == 2
    assert words in capsys.readouterr().err


def test_a_transcoder_equal_to_the_mlp_leaves_the_loss_unchanged(tmp_path, tiny_model_dir):
    """A ReLU GPT-2's MLP is c_proj(relu(c_fc x)): exactly a ReLU transcoder from mlp_in to mlp_out. Spliced in by
    saex eval, it must leave the next-token loss as it is (loss recovered 1) and reconstruct mlp_out (FVU ~0)."""
    import transformers

    from saex.sae.io import save_sae

    folder = tmp_path / "relu-gpt2"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir["gpt2"])
    model.config.activation_function = "relu"
    model = transformers.AutoModelForCausalLM.from_config(model.config)  # GELU -> ReLU in a fresh module tree
    model.load_state_dict(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir["gpt2"]).state_dict())
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dir["gpt2"]).save_pretrained(folder)
    run = tmp_path / "run"
    assert main(["harvest", "--run", str(run), "--model", str(folder), "--dataset", "wiki", "--max-examples", "30",
                 "--hook", *HOOKS]) == 0
    mlp = model.transformer.h[1].mlp
    d_mlp = mlp.c_fc.weight.shape[1]
    sae = SAE(SAEConfig(d_in=D, d_sae=d_mlp, architecture="relu", transcoder=True, d_out=D),
              metadata={"model": str(folder), "hook": HOOKS[0], "target_hook": HOOKS[1]})
    with torch.no_grad():  # GPT-2's Conv1D computes x W + b with W [in, out]: SAELens' W_enc and W_dec layouts
        sae.W_enc.copy_(mlp.c_fc.weight)
        sae.b_enc.copy_(mlp.c_fc.bias)
        sae.W_dec.copy_(mlp.c_proj.weight)
        sae.b_dec.copy_(mlp.c_proj.bias)
    save_sae(sae, run / "saes" / "exact")
    assert main(["eval", "--run", str(run), "--examples", "20", "--no-probing"]) == 0
    m = json.loads((run / "saes" / "exact" / "metrics.json").read_text())
    assert m["target_hook"] == HOOKS[1] and m["fvu"] < 1e-6, m["fvu"]
    assert abs(m["downstream"]["loss_recovered"] - 1) < 1e-4 and m["downstream"]["kl"] < 1e-6, m["downstream"]
