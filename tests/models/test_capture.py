"""Captured activations against transformers' own output_hidden_states, for every family."""

import numpy as np
import pytest
import torch
from PIL import Image

from saex.models import load_model
from tests.tiny_models import TINY_FAMILIES

TEXTS = ["The cat sat on the mat.", "Sparse autoencoders find features in a transformer's residual stream.", "Hi"]


def _inputs(adapter):
    if adapter.modality == "image":
        rng = np.random.default_rng(0)
        return [Image.fromarray((rng.random((40 + 7 * i, 36, 3)) * 255).astype("uint8")) for i in range(3)]
    return TEXTS


def _hidden_states(adapter, batch):
    with torch.no_grad():
        return adapter.backbone(**adapter.on_device(batch).inputs, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_resid_matches_hidden_states_exactly(family, tiny_model_dir):
    adapter = load_model(str(tiny_model_dir[family]))
    assert adapter.family.name == family
    batch = adapter.prepare(_inputs(adapter))
    hidden = _hidden_states(adapter, batch)
    n = adapter.n_layers
    # hidden_states[L] is the input of block L; the last one may have the final norm applied, so
    # resid_post is compared for every block but the last, resid_pre for every block
    for layer in range(n):
        pre = adapter.capture(batch, [adapter.hook(f"blocks.{layer}.hook_resid_pre")])
        assert torch.equal(pre[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    for layer in range(n - 1):
        post = adapter.capture(batch, [adapter.hook(f"blocks.{layer}.hook_resid_post")])
        assert torch.equal(post[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_several_hooks_in_one_pass(family, tiny_model_dir):
    adapter = load_model(str(tiny_model_dir[family]))
    batch = adapter.prepare(_inputs(adapter))
    hidden = _hidden_states(adapter, batch)
    names = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    out = adapter.capture(batch, [adapter.hook(h) for h in names])
    assert set(out) == set(names)
    assert torch.equal(out["blocks.1.hook_resid_pre"], hidden[1])
    assert torch.equal(out["blocks.0.hook_resid_post"], hidden[1])
    assert out["blocks.1.hook_mlp_out"].shape == hidden[1].shape


def _mlp_of_residual(family, block, resid_mid):
    """What a block's MLP adds to the residual stream, recomputed by hand from its mid-block residual."""
    if family == "clip" or family == "siglip":
        return block.mlp(block.layer_norm2(resid_mid))
    if family == "vit":
        return block.mlp(block.layernorm_after(resid_mid))
    if family.startswith("dinov2"):
        return block.layer_scale2(block.mlp(block.norm2(resid_mid)))
    if family == "gpt2":
        return block.mlp(block.ln_2(resid_mid))
    if family == "llama":
        return block.mlp(block.post_attention_layernorm(resid_mid))
    raise KeyError(family)


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "bert"])
def test_mlp_out_is_what_the_mlp_adds(family, tiny_model_dir):
    # pre-LN blocks: resid_post = resid_mid + MLP(norm(resid_mid)), so resid_mid = resid_post - mlp_out
    adapter = load_model(str(tiny_model_dir[family]))
    batch = adapter.prepare(_inputs(adapter))
    layer = 1
    out = adapter.capture(batch, [adapter.hook(f"blocks.{layer}.hook_mlp_out"), adapter.hook(f"blocks.{layer}.hook_resid_post")])
    mlp_out, post = out[f"blocks.{layer}.hook_mlp_out"], out[f"blocks.{layer}.hook_resid_post"]
    with torch.no_grad():
        expected = _mlp_of_residual(family, adapter.blocks[layer], post - mlp_out)
    torch.testing.assert_close(mlp_out, expected, atol=1e-4, rtol=1e-4)
    assert mlp_out.abs().mean() > 0


def test_bert_mlp_out_is_the_output_dense(tiny_model_dir):
    # post-LN BERT: resid_post = LayerNorm(mlp_out + attention_output)
    adapter = load_model(str(tiny_model_dir["bert"]))
    batch = adapter.prepare(TEXTS)
    block = adapter.blocks[1]
    seen = {}
    handle = block.attention.register_forward_hook(lambda m, a, o: seen.update(attn=o[0]))
    out = adapter.capture(batch, [adapter.hook("blocks.1.hook_mlp_out"), adapter.hook("blocks.1.hook_resid_post")])
    handle.remove()
    expected = block.output.LayerNorm(out["blocks.1.hook_mlp_out"] + seen["attn"])
    torch.testing.assert_close(out["blocks.1.hook_resid_post"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["clip", "llama"])
def test_forward_stops_after_the_deepest_hook(family, tiny_model_dir):
    adapter = load_model(str(tiny_model_dir[family]))
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(adapter.blocks)]
    adapter.capture(adapter.prepare(_inputs(adapter)), [adapter.hook("blocks.0.hook_resid_post")])
    assert calls == [0]
    calls.clear()
    adapter.capture(adapter.prepare(_inputs(adapter)), [adapter.hook("blocks.1.hook_resid_pre")])
    assert calls == [0]
    for h in handles:
        h.remove()


def test_clip_keeps_its_text_tower(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["clip"]))
    assert hasattr(adapter.model, "text_model") and adapter.backbone is adapter.model.vision_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_last_layer_is_before_the_final_norm(family, tiny_model_dir):
    adapter = load_model(str(tiny_model_dir[family]))
    batch = adapter.prepare(TEXTS)
    last = adapter.n_layers - 1
    post = adapter.capture(batch, [adapter.hook(f"blocks.{last}.hook_resid_post")])[f"blocks.{last}.hook_resid_post"]
    final_norm = adapter.backbone.ln_f if family == "gpt2" else adapter.backbone.norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(post), _hidden_states(adapter, batch)[-1])


def test_bfloat16_capture_is_close_to_float32(tiny_model_dir):
    full = load_model(str(tiny_model_dir["vit"]))
    half = load_model(str(tiny_model_dir["vit"]), dtype=torch.bfloat16)
    images = _inputs(full)
    hook = [full.hook("blocks.1.hook_resid_post")]
    a = full.capture(full.prepare(images), hook)["blocks.1.hook_resid_post"]
    b = half.capture(half.prepare(images), hook)["blocks.1.hook_resid_post"]
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a, atol=0.1, rtol=0.05)


def test_real_minilm_layer3_matches_hidden_states():
    adapter = load_model("minilm")
    assert (adapter.n_layers, adapter.d_model) == (6, 384)
    batch = adapter.prepare(TEXTS)
    out = adapter.capture(batch, [adapter.hook("blocks.3.hook_resid_post")])["blocks.3.hook_resid_post"]
    assert torch.equal(out, _hidden_states(adapter, batch)[4])


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES])
def test_mlp_out_directions_are_what_each_neuron_writes(family, tiny_model_dir):
    # hook_mlp_out = (hidden neuron activations) @ directions (+ bias): check by capturing both
    adapter = load_model(str(tiny_model_dir[family]))
    layer = 1
    W = adapter.mlp_out_directions(layer)
    assert W.shape[1] == adapter.d_model and W.shape[0] >= adapter.d_model
    batch = adapter.prepare(_inputs(adapter))
    mlp_out = adapter.capture(batch, [adapter.hook(f"blocks.{layer}.hook_mlp_out")])[f"blocks.{layer}.hook_mlp_out"]
    block = adapter.blocks[layer]
    from saex.models.families import mlp_out_of

    out_module = mlp_out_of(block)
    proj = [m for m in (block.mlp if hasattr(out_module, "lambda1") else out_module).modules()
            if getattr(m, "weight", None) is not None and m.weight.dim() == 2 and adapter.d_model in m.weight.shape][-1]
    seen = {}
    h = proj.register_forward_hook(lambda m, a, o: seen.update(inp=a[0]))
    adapter.capture(batch, [adapter.hook(f"blocks.{layer}.hook_mlp_out")])
    h.remove()
    bias = proj.bias if proj.bias is not None else 0
    if hasattr(out_module, "lambda1"):
        bias = bias * out_module.lambda1
    torch.testing.assert_close(seen["inp"] @ W + bias, mlp_out, atol=1e-5, rtol=1e-4)
