"""hook_attn_out and hook_mlp_in against the block's own arithmetic, recomputed by hand, for every family;
and harvested hook_mlp_in rows against a plain forward hook on the MLP of the transformers model."""

import pytest
import torch
import transformers

from saex.cli import main
from saex.models import load_model
from saex.store import ActivationStore
from tests.models.test_capture import _inputs
from tests.tiny_models import TINY_FAMILIES

SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")
NORM_BEFORE_MLP = {"clip": "layer_norm2", "siglip": "layer_norm2", "vit": "layernorm_after", "dinov2": "norm2",
                   "dinov2_with_registers": "norm2", "gpt2": "ln_2", "llama": "post_attention_layernorm"}


def _all_sites(family, tiny_model_dir, layer=1):
    adapter = load_model(str(tiny_model_dir[family]))
    batch = adapter.prepare(_inputs(adapter))
    out = adapter.capture(batch, [adapter.hook(f"blocks.{layer}.{s}") for s in SITES])
    return adapter, adapter.blocks[layer], {s: out[f"blocks.{layer}.{s}"] for s in SITES}


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "bert"])
def test_pre_norm_blocks_add_attention_then_mlp(family, tiny_model_dir):
    # resid_post = resid_pre + attn_out + mlp_out, and the MLP reads norm(resid_pre + attn_out)
    _, block, a = _all_sites(family, tiny_model_dir)
    torch.testing.assert_close(a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"], a["hook_resid_post"],
                               atol=1e-5, rtol=1e-5)
    norm = block.get_submodule(NORM_BEFORE_MLP[family])
    with torch.no_grad():
        torch.testing.assert_close(a["hook_mlp_in"], norm(a["hook_resid_pre"] + a["hook_attn_out"]), atol=1e-5, rtol=1e-5)
    assert a["hook_attn_out"].abs().mean() > 0 and a["hook_mlp_in"].shape == a["hook_resid_pre"].shape


def test_bert_attention_output_and_mlp_input(tiny_model_dir):
    # post-LN BERT: the MLP reads LayerNorm(attn_out + resid_pre); resid_post = LayerNorm(mlp_out + that)
    _, block, a = _all_sites("bert", tiny_model_dir)
    with torch.no_grad():
        mlp_in = block.attention.output.LayerNorm(a["hook_attn_out"] + a["hook_resid_pre"])
        torch.testing.assert_close(a["hook_mlp_in"], mlp_in, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["hook_resid_post"], block.output.LayerNorm(a["hook_mlp_out"] + mlp_in),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_an_edit_at_mlp_in_is_what_the_mlp_reads(family, tiny_model_dir):
    adapter, block, a = _all_sites(family, tiny_model_dir)
    batch = adapter.prepare(_inputs(adapter))
    point = adapter.hook("blocks.1.hook_mlp_in")
    capture_mlp_out = lambda: adapter.capture(batch, [adapter.hook("blocks.1.hook_mlp_out")])["blocks.1.hook_mlp_out"]  # noqa: E731
    same = adapter.run_edited(capture_mlp_out, point, lambda x: x.clone())
    torch.testing.assert_close(same, a["hook_mlp_out"])
    zeroed = adapter.run_edited(capture_mlp_out, point, torch.zeros_like)
    with torch.no_grad():
        torch.testing.assert_close(zeroed, block.mlp(torch.zeros_like(a["hook_mlp_in"])), atol=1e-6, rtol=1e-6)


def test_harvested_mlp_in_and_attn_out_equal_forward_hooks(tmp_path, tiny_model_dir):
    folder = tiny_model_dir["gpt2"]
    assert main(["harvest", "--run", str(tmp_path), "--model", str(folder), "--dataset", "wiki", "--max-examples", "4",
                 "--order", "dataset", "--hook", "blocks.1.hook_mlp_in", "blocks.1.hook_attn_out"]) == 0
    store = ActivationStore(tmp_path / "acts")
    names = ["acts.blocks.1.hook_mlp_in", "acts.blocks.1.hook_attn_out", "example", "position"]
    rows = next(store.iter_ordered(names, len(store)))
    from saex.data import open_dataset

    model, adapter = transformers.AutoModel.from_pretrained(folder), load_model(str(folder))  # adapter: tokenises
    seen = {}
    h1 = model.h[1].mlp.register_forward_pre_hook(lambda m, args: seen.update(mlp_in=args[0]))
    h2 = model.h[1].attn.register_forward_hook(lambda m, args, out: seen.update(attn_out=out[0]))
    wiki = open_dataset("wiki")
    for example in rows["example"].unique().tolist():
        with torch.no_grad():
            model(**adapter.prepare([wiki[example].input], store.manifest["context_size"]).inputs)
        sel = rows["example"] == example
        pos = rows["position"][sel]
        for site in ("mlp_in", "attn_out"):
            torch.testing.assert_close(rows[f"acts.blocks.1.hook_{site}"][sel].float(), seen[site][0, pos],
                                       rtol=2 ** -7, atol=1e-2)
    h1.remove(), h2.remove()
