import json

import numpy as np
import pytest
import torch
from PIL import Image

from saex.analysis.attribution import (_gate_fractions, gradient_x_input, integrated_gradients, model_image, occlusion,
                                       overlay_png)
from saex.analysis.feature_fn import feature_magnitude
from saex.models import load_model
from saex.sae import SAE, SAEConfig

PATCH = 6  # the hand-built ViT reads patch 6 of its 4 x 4 grid of 8-pixel patches: rows 8..15, columns 16..23
ROWS, COLS = slice(8, 16), slice(16, 24)
TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def vit(tiny_model_dir):
    return load_model(str(tiny_model_dir["vit"]))


@pytest.fixture(scope="module")
def text_models(tiny_model_dir):
    return {name: load_model(str(tiny_model_dir[name])) for name in ("bert", "gpt2")}


def image_batch(adapter, seed=0):
    rng = np.random.RandomState(seed)
    return adapter.prepare([Image.fromarray(rng.randint(0, 256, (32, 32, 3), dtype=np.uint8))])


def random_sae(d_in=32, arch="relu", seed=0, **kw):
    torch.manual_seed(seed)
    return SAE(SAEConfig(d_in=d_in, d_sae=64, architecture=arch, decoder_init_norm=1.0, **kw))


def active_feature(adapter, sae, batch, point, tokens, positions=None):
    """The feature with the largest ReLU pre-activation summed over the chosen tokens, by capture."""
    acts = adapter.capture(batch, [adapter.hook(point)])[point][0]
    if positions is None:
        positions = adapter.select(batch, acts.shape[0], tokens)[0].nonzero().flatten().tolist()
    total = torch.relu(sae.pre_acts(acts[positions])).sum(0).detach()
    j = int(total.argmax())
    assert total[j] > 0
    return j, float(total[j])


# -- what F is ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "prolu"])
def test_feature_magnitude_is_the_code_where_the_feature_fires(arch):
    sae = random_sae(arch=arch, k=8)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05)
        if arch == "gated":
            sae.arch.r_mag.normal_(0, 0.5)
            sae.arch.b_mag.normal_(0, 0.05)
        if arch == "jumprelu":
            sae.arch.threshold.fill_(0.05)
    x = torch.randn(50, 32)
    code = sae.encode(x).dense().detach()
    m = torch.stack([feature_magnitude(sae, x, j) for j in range(64)], -1).detach()
    fires = code > 0
    assert fires.any() and (m >= 0).all()
    torch.testing.assert_close(m[fires], code[fires], rtol=1e-5, atol=1e-6)
    if arch == "relu":
        torch.testing.assert_close(m, code)


# -- integrated gradients: completeness ---------------------------------------------------------------


@pytest.mark.parametrize("point,tokens", [("blocks.1.hook_resid_post", "cls"), ("blocks.2.hook_resid_post", "patches")])
def test_ig_completeness_on_a_tiny_vit(vit, point, tokens):
    batch, sae = image_batch(vit), random_sae()
    j, f = active_feature(vit, sae, batch, point, tokens)
    r = integrated_gradients(vit, sae, point, tokens, j, batch, steps=64)
    c = r.completeness
    assert r.values.shape == (32, 32) and r.kind == "integrated_gradients"
    assert r.value == pytest.approx(f, rel=1e-5) and r.code_value == pytest.approx(f, rel=1e-5)  # ReLU: F = code
    assert c["delta"] == pytest.approx(c["f_input"] - c["f_baseline"]) and c["f_input"] == r.value
    assert c["sum"] == pytest.approx(float(r.values.sum()), rel=1e-5)
    assert c["relative_error"] < 0.01, c
    assert abs(c["delta"]) > 1e-3  # a real change from the baseline, not 0 = 0


@pytest.mark.parametrize("name,tokens", [("bert", "content"), ("gpt2", "all")])
def test_ig_completeness_on_tiny_text_models(text_models, name, tokens):
    adapter, point = text_models[name], "blocks.2.hook_resid_post"
    batch, sae = adapter.prepare([TEXT]), random_sae()
    j, f = active_feature(adapter, sae, batch, point, tokens)
    r = integrated_gradients(adapter, sae, point, tokens, j, batch, steps=64)
    assert r.value == pytest.approx(f, rel=1e-4)  # through inputs_embeds as through input_ids
    assert r.values.shape == (batch.inputs["input_ids"].shape[1],)
    assert r.tokens == adapter.processor.convert_ids_to_tokens(batch.inputs["input_ids"][0].tolist())
    assert [t for t, _ in r.token_values()] == r.tokens and r.params["baseline"] == "pad"
    assert r.completeness["relative_error"] < 0.01, r.completeness
    assert abs(r.completeness["delta"]) > 1e-3


def test_gate_fractions_by_hand():
    # cell edges: the ends, and between cells the mean of the midpoints on either side
    frac = _gate_fractions(torch.tensor([[-1.0, 1.0], [1.0, -3.0]]), torch.tensor([-1.0, 3.0]),
                           torch.tensor([1.0, -5.0]))
    # position 0: -1 | -1 | 0 | 1 | 1: cell 0 all negative, cell 1 positive but for its left edge
    # position 1: 3 | 1 | -1 | -3 | -5: cell 0 positive on its left half and half its right half
    torch.testing.assert_close(frac, torch.tensor([[0.0, 0.75], [1.0, 0.0]]))


def test_the_kinks_rule_beats_the_plain_midpoint_rule(vit):
    batch, sae, point = image_batch(vit, seed=2), random_sae(seed=2), "blocks.2.hook_resid_post"
    j, _ = active_feature(vit, sae, batch, point, "patches")
    errors = {rule: integrated_gradients(vit, sae, point, "patches", j, batch, steps=32, rule=rule)
              .completeness["relative_error"] for rule in ("kinks", "midpoint")}
    assert errors["kinks"] < errors["midpoint"] / 3


def test_ig_converges_with_steps(vit):
    batch, sae, point = image_batch(vit, seed=1), random_sae(seed=1), "blocks.1.hook_resid_post"
    j, _ = active_feature(vit, sae, batch, point, "cls")
    few, many = (integrated_gradients(vit, sae, point, "cls", j, batch, steps=s) for s in (2, 128))
    assert many.completeness["relative_error"] < few.completeness["relative_error"]
    gl = integrated_gradients(vit, sae, point, "cls", j, batch, steps=32, rule="gausslegendre")
    assert gl.completeness["relative_error"] < 0.01 and gl.params["rule"] == "gausslegendre"


# -- gradient x input against autograd by hand ---------------------------------------------------------


def test_gradient_x_input_matches_autograd_by_hand_on_an_image(vit):
    batch, sae, point = image_batch(vit), random_sae(), "blocks.1.hook_resid_post"
    j, _ = active_feature(vit, sae, batch, point, "cls")
    r = gradient_x_input(vit, sae, point, "cls", j, batch)
    x = vit.on_device(batch).inputs["pixel_values"].clone().requires_grad_(True)
    hidden = vit.backbone(pixel_values=x, output_hidden_states=True).hidden_states[2]  # after block 1
    f = torch.relu(sae.pre_acts(hidden[0, 0]))[j]
    (g,) = torch.autograd.grad(f, x)
    assert r.value == pytest.approx(f.item(), rel=1e-5)
    torch.testing.assert_close(r.values, (g * x).detach()[0].sum(0), rtol=1e-4, atol=1e-6)


def test_gradient_x_input_matches_finite_differences_on_text(text_models):
    adapter, point = text_models["gpt2"], "blocks.1.hook_resid_post"
    batch, sae = adapter.prepare([TEXT]), random_sae(seed=2)
    j, _ = active_feature(adapter, sae, batch, point, "all")
    r = gradient_x_input(adapter, sae, point, "all", j, batch)
    emb = adapter.model.get_input_embeddings()(batch.inputs["input_ids"]).detach().double()
    model = adapter.backbone.double()
    try:
        def F(e):
            with torch.no_grad():
                h = model(inputs_embeds=e, attention_mask=batch.inputs["attention_mask"],
                          output_hidden_states=True).hidden_states[2]
                return float(torch.relu(sae.double().pre_acts(h[0])).sum(0)[j])
        for t in (1, 4):  # d F(x + s x_t) / ds at s = 0 is token t's gradient x input
            step = torch.zeros_like(emb)
            step[0, t] = emb[0, t] * 1e-5
            fd = (F(emb + step) - F(emb - step)) / 2e-5
            assert r.values[t].item() == pytest.approx(fd, rel=1e-3, abs=1e-7)
    finally:
        model.float()
        sae.float()


# -- hand-built ground truth: a model whose feature reads one known patch ---------------------------------


@pytest.fixture
def one_patch_vit(tiny_model_dir):
    """The tiny ViT with block 0's attention rebuilt so that every token, [CLS] included, attends to patch 6
    alone: hidden dim 0 is a marker that only patch 6's position embedding carries, every query is the
    same constant and the keys read the marker, so patch 6's score beats every other by thousands and the
    softmax puts exactly 0 elsewhere. [CLS] after block 0 is then a function of patch 6's pixels only."""
    adapter = load_model(str(tiny_model_dir["vit"]))
    emb, attn = adapter.backbone.embeddings, adapter.blocks[0].attention
    heads, head_dim = 4, 8
    with torch.no_grad():
        emb.patch_embeddings.projection.weight[0] = 0
        emb.patch_embeddings.projection.bias[0] = 0
        emb.cls_token[..., 0] = 0
        emb.position_embeddings[..., 0] = 0
        emb.position_embeddings[0, 1 + PATCH, 0] = 10.0
        attn.q_proj.weight.zero_()
        attn.q_proj.bias.zero_()
        attn.k_proj.weight.zero_()
        attn.k_proj.bias.zero_()
        for h in range(heads):
            attn.q_proj.bias[h * head_dim] = 100.0
            attn.k_proj.weight[h * head_dim, 0] = 100.0
        attn.v_proj.weight.mul_(10)  # a strong read: random init's 0.02 would leave patch 6 a faint voice
        attn.o_proj.weight.mul_(10)
    return adapter


def _outside(values_HW):
    rest = values_HW.clone()
    rest[ROWS, COLS] = 0
    return rest


def test_occlusion_peaks_at_the_patch_a_hand_built_model_reads(one_patch_vit, vit):
    batch, sae, point = image_batch(one_patch_vit), random_sae(), "blocks.0.hook_resid_post"
    j, _ = active_feature(one_patch_vit, sae, batch, point, "cls")
    occ = occlusion(one_patch_vit, sae, point, "cls", j, batch)
    assert occ.params["window"] == 8 and occ.params["stride"] == 8  # the model's patch size
    per_patch = occ.values[::8, ::8].flatten()  # one value per patch, row-major like the tokens
    assert int(per_patch.abs().argmax()) == PATCH and per_patch[PATCH].abs() > 1e-2
    assert torch.all(occ.values[ROWS, COLS] == occ.values[8, 16])  # one value over the whole window
    assert _outside(occ.values).abs().max() < 1e-7
    for r in (gradient_x_input(one_patch_vit, sae, point, "cls", j, batch),
              integrated_gradients(one_patch_vit, sae, point, "cls", j, batch, steps=64)):
        assert _outside(r.values).abs().max() < 1e-7, r.kind
        assert r.values[ROWS, COLS].abs().max() > 1e-4, r.kind
    assert r.completeness["relative_error"] < 0.01
    # the unmodified model's [CLS] reads every patch: the ground truth above is the construction's doing
    j0, _ = active_feature(vit, sae, batch, point, "cls")
    assert _outside(occlusion(vit, sae, point, "cls", j0, batch).values).abs().max() > 1e-4


def test_a_patch_position_before_block_0_reads_only_its_patch(vit):
    batch, sae, point = image_batch(vit, seed=3), random_sae(seed=3), "blocks.0.hook_resid_pre"
    j, _ = active_feature(vit, sae, batch, point, "patches", [1 + PATCH])
    occ = occlusion(vit, sae, point, "patches", j, batch, positions=[1 + PATCH])
    gxi = gradient_x_input(vit, sae, point, "patches", j, batch, positions=[1 + PATCH])
    assert int(occ.values[::8, ::8].flatten().abs().argmax()) == PATCH
    assert _outside(occ.values).abs().max() < 1e-6 and _outside(gxi.values).abs().max() == 0
    assert gxi.positions == [1 + PATCH]


def test_a_causal_model_attributes_nothing_to_later_tokens(text_models):
    adapter, point = text_models["gpt2"], "blocks.2.hook_resid_post"
    batch, sae, t = adapter.prepare([TEXT]), random_sae(seed=4), 4
    j, _ = active_feature(adapter, sae, batch, point, "all", [t])
    for r in (gradient_x_input(adapter, sae, point, "all", j, batch, positions=[t]),
              integrated_gradients(adapter, sae, point, "all", j, batch, positions=[t]),
              occlusion(adapter, sae, point, "all", j, batch, positions=[t])):
        assert r.values[t + 1:].abs().max() < 1e-7, r.kind
        assert r.values[:t + 1].abs().max() > 1e-5, r.kind


def test_text_occlusion_window_slides_by_one(text_models):
    adapter, point = text_models["gpt2"], "blocks.0.hook_resid_pre"  # token t's row reads only token t
    batch, sae, t = adapter.prepare([TEXT]), random_sae(seed=5), 5
    j, _ = active_feature(adapter, sae, batch, point, "all", [t])
    one = occlusion(adapter, sae, point, "all", j, batch, positions=[t])
    two = occlusion(adapter, sae, point, "all", j, batch, positions=[t], window=2)
    assert (one.values.abs() > 1e-6).nonzero().flatten().tolist() == [t]
    # windows [t-1, t] and [t, t+1] hold t; t-1 and t+1 share one of their two windows with it
    assert (two.values.abs() > 1e-6).nonzero().flatten().tolist() == [t - 1, t, t + 1]
    assert two.values[t].item() == pytest.approx(one.values[t].item(), rel=1e-5)
    assert two.values[t - 1].item() == pytest.approx(one.values[t].item() / 2, rel=1e-5)


# -- outputs and errors ----------------------------------------------------------------------------------


def test_overlay_and_json(vit, tmp_path):
    batch, sae, point = image_batch(vit), random_sae(), "blocks.1.hook_resid_post"
    j, _ = active_feature(vit, sae, batch, point, "cls")
    r = integrated_gradients(vit, sae, point, "cls", j, batch, steps=4)
    image = model_image(vit, batch)
    assert image.size == (32, 32)
    assert np.array_equal(np.asarray(image), batch.inputs["pixel_values"][0].permute(1, 2, 0).numpy())
    data = overlay_png(image, r.values, tmp_path / "ig.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "ig.png").read_bytes() == data
    back = json.loads(json.dumps(r.to_json()))
    assert back["shape"] == [32, 32] and back["feature"] == j and back["completeness"]["sum"] == r.completeness["sum"]
    with pytest.raises(ValueError, match=r"token_values is for text"):
        r.token_values()


def test_bad_inputs_raise_clear_errors(vit, text_models):
    batch, sae, point = image_batch(vit), random_sae(), "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match=r"feature 64 does not exist: this SAE has features 0\.\.63"):
        gradient_x_input(vit, sae, point, "cls", 64, batch)
    with pytest.raises(ValueError, match=r"feature -1 does not exist"):
        integrated_gradients(vit, sae, point, "cls", -1, batch)
    with pytest.raises(ValueError, match=r"feature 1.5 does not exist"):
        integrated_gradients(vit, sae, point, "cls", 1.5, batch)
    assert gradient_x_input(vit, sae, point, "cls", np.int64(3), batch).feature == 3
    with pytest.raises(ValueError, match=r"positions \[0\] are not among the tokens that 'patches' selects "
                                         r"\(valid: 1\.\.16\)"):
        occlusion(vit, sae, point, "patches", 0, batch, positions=[0])
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        integrated_gradients(vit, sae, point, "cls", 0, batch, steps=0)
    with pytest.raises(ValueError, match=r"window must be an integer in 1\.\.32 \(pixels of this input\), got 0"):
        occlusion(vit, sae, point, "cls", 0, batch, window=0)
    with pytest.raises(ValueError, match=r"window must be an integer in 1\.\.11 \(tokens of this input\), got 12"):
        occlusion(text_models["bert"], sae, point, "all", 0, text_models["bert"].prepare([TEXT]), window=12)
    with pytest.raises(ValueError, match=r"stride must be"):
        occlusion(vit, sae, point, "cls", 0, batch, stride=-1)
    with pytest.raises(ValueError, match=r"baseline 'pad' is not valid for image; valid: \['zeros', 'black'\]"):
        integrated_gradients(vit, sae, point, "cls", 0, batch, baseline="pad")
    with pytest.raises(ValueError, match=r"baseline of shape \[3, 8, 8\] does not match the input \[1, 3, 32, 32\]"):
        occlusion(vit, sae, point, "cls", 0, batch, baseline=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"rule 'simpson' is not one of"):
        integrated_gradients(vit, sae, point, "cls", 0, batch, rule="simpson")
    with pytest.raises(ValueError, match=r"one input at a time; this batch holds 2"):
        gradient_x_input(vit, sae, point, "cls", 0, vit.prepare([model_image(vit, batch)] * 2))
    with pytest.raises(ValueError, match=r"token selection 'content' is not valid"):
        gradient_x_input(vit, sae, point, "content", 0, batch)


def test_black_baseline_and_tensor_baseline_agree(vit):
    batch, sae, point = image_batch(vit), random_sae(), "blocks.1.hook_resid_post"
    j, _ = active_feature(vit, sae, batch, point, "cls")
    black = vit.finish_pixels(torch.zeros(1, 3, 32, 32))
    a = integrated_gradients(vit, sae, point, "cls", j, batch, steps=8, baseline="black")
    b = integrated_gradients(vit, sae, point, "cls", j, batch, steps=8, baseline=black[0])
    torch.testing.assert_close(a.values, b.values)
    assert a.params["baseline"] == "black" and b.params["baseline"] == "tensor"
