"""The feature lens on tiny random models of each family, against the model's own final norm and head."""

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from saex.analysis.lens import feature_lens, index_lens, lens_tables, output_weights
from saex.models import load_model
from saex.models.heads import lens_readout, prompt_features


def _no_eps(norm):
    """The lens leaves the norm's eps out; so does the reference."""
    for name in ("eps", "variance_epsilon"):
        if hasattr(norm, name):
            setattr(norm, name, 0.0)


def _random_gamma(norm):
    with torch.no_grad():
        norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)  # the lens must multiply by the norm's weight


@pytest.mark.parametrize("family, norm_of", [("gpt2", lambda m: m.transformer.ln_f), ("llama", lambda m: m.model.norm)])
def test_logit_lens_is_the_models_final_norm_and_unembedding(tiny_model_dir, family, norm_of):
    adapter = load_model(str(tiny_model_dir[family]))
    model, norm = adapter.model, norm_of(adapter.model)
    _no_eps(norm), _random_gamma(norm)
    readout = lens_readout(adapter)
    assert readout["kind"] == "next_token" and readout["norm"] == ("layernorm" if family == "gpt2" else "rmsnorm")
    v = torch.randn(6, adapter.d_model)
    with torch.no_grad():  # direct path through the model's own modules, biases (the norm's beta) subtracted
        ref = model.lm_head(norm(v)) - (model.lm_head(norm.bias) if getattr(norm, "bias", None) is not None else 0)
    torch.testing.assert_close(output_weights(readout, v), ref, rtol=1e-4, atol=1e-5)

    W_U = model.get_output_embeddings().weight.detach()
    tokens = [2000, 7592, 3899]  # 'to', 'hello', ... in MiniLM's vocabulary, which the tiny models use
    W_dec = torch.cat([W_U[tokens], v[:3]])
    lens = feature_lens(readout, W_dec, W_dec.flip(0), show_progress=False)
    assert lens.dec.top_ids_SK[:3, 0].tolist() == tokens  # its own unembedding row puts the token first
    names = adapter.processor.batch_decode([[t] for t in tokens])
    assert [lens.names[i] for i in lens.dec.top_ids_SK[:3, 0].tolist()] == names == ["to", "hello", names[2]]
    full = output_weights(readout, W_dec)  # brute force: sort all weights
    assert torch.equal(lens.dec.top_ids_SK, full.argsort(1, descending=True)[:, :10])
    assert torch.equal(lens.dec.bottom_ids_SK, full.argsort(1)[:, :10])
    torch.testing.assert_close(lens.dec.top_SK, full.sort(1, descending=True).values[:, :10])


def test_classifier_lens_is_the_final_layernorm_and_classifier(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["vit"]))
    model = adapter.model
    _no_eps(model.vit.layernorm), _random_gamma(model.vit.layernorm)
    readout = lens_readout(adapter)
    assert readout["kind"] == "classifier" and readout["names"] == [model.config.id2label[i] for i in range(5)]
    v = torch.randn(4, adapter.d_model)
    ln = model.vit.layernorm
    with torch.no_grad():  # the class token's head; the LayerNorm's beta and so the classifier's bias subtracted
        ref = model.classifier(ln(v)) - model.classifier(ln.bias)
    torch.testing.assert_close(output_weights(readout, v), ref, rtol=1e-4, atol=1e-5)
    W_dec = model.classifier.weight.detach().clone()  # each class's head row
    lens = feature_lens(readout, W_dec, W_dec, show_progress=False)
    assert lens.dec.top_ids_SK[:, 0].tolist() == list(range(5))
    assert lens.dec.top_SK.shape == (5, 2)  # 5 classes: 2 promoted, 2 suppressed shown (at most half each)


def test_clip_lens_reads_the_nearest_label_prompts(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["clip"]))
    labels = ["cat", "dog", "car", "plane", "tree", "boat"]
    readout = lens_readout(adapter, labels)
    assert readout["kind"] == "zero_shot" and readout["cosine"] and readout["names"] == labels
    assert lens_readout(adapter) is None  # no label names: no prompts to read through
    model, prompts = adapter.model, prompt_features(adapter, labels)
    post, proj = model.vision_model.post_layernorm, model.visual_projection
    v = torch.randn(3, adapter.d_model)
    with torch.no_grad():
        ref = F.normalize(proj(post(v)) - proj(post.bias), dim=1) @ prompts.T
    torch.testing.assert_close(output_weights(readout, v), ref, rtol=1e-4, atol=1e-5)
    # a vector the projection maps onto prompt c's text feature is read as prompt c, with cosine 1
    target = torch.linalg.lstsq(readout["pre_DE"].T, prompts.T).solution.T  # [6, d]: target @ pre = prompts
    lens = feature_lens(readout, target, target, show_progress=False)
    assert lens.dec.top_ids_SK[:, 0].tolist() == list(range(6))
    torch.testing.assert_close(lens.dec.top_SK[:, 0], torch.ones(6), rtol=0, atol=1e-4)


def test_encoder_lens_reads_nearest_input_embeddings_and_tied_weights_agree(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["bert"]))
    readout = lens_readout(adapter)
    assert readout["kind"] == "embedding" and readout["cosine"] and readout["norm"] is None
    E = adapter.model.get_input_embeddings().weight.detach()
    tokens = [2000, 7592, 1037]
    W = torch.cat([E[tokens], torch.randn(2, adapter.d_model)])
    lens = feature_lens(readout, W, W, show_progress=False)  # tied: encoder = decoder
    assert lens.dec.top_ids_SK[:3, 0].tolist() == tokens
    torch.testing.assert_close(lens.dec.top_SK[:3, 0], torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(lens.vector_cos_S, torch.ones(5), rtol=0, atol=1e-5)
    torch.testing.assert_close(lens.weights_cos_S, torch.ones(5), rtol=0, atol=1e-5)
    assert torch.equal(lens.enc.top_ids_SK, lens.dec.top_ids_SK) and torch.equal(lens.enc.bottom_ids_SK, lens.dec.bottom_ids_SK)
    ref = F.normalize(W, dim=1) @ F.normalize(E, dim=1).T  # cosine with every input embedding
    assert lens.dec.bottom_ids_SK[:, 0].tolist() == ref.argmin(1).tolist()
    untied = feature_lens(readout, W, -W, show_progress=False)
    torch.testing.assert_close(untied.vector_cos_S, -torch.ones(5), rtol=0, atol=1e-5)
    assert torch.equal(untied.enc.top_ids_SK, lens.dec.bottom_ids_SK)  # -v promotes what v suppresses


def test_chunks_statistics_and_histogram_match_a_brute_force_pass(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["gpt2"]))
    readout = lens_readout(adapter)
    W_U = adapter.model.get_output_embeddings().weight.detach()
    W_dec = torch.cat([torch.randn(5, adapter.d_model), 30 * W_U[[11, 12]].sum(0, keepdim=True), -W_U[[40]]])
    W_enc = torch.randn_like(W_dec)
    whole = feature_lens(readout, W_dec, W_enc, show_progress=False)
    V = readout["out_VE"].shape[0]
    chunked = feature_lens(readout, W_dec, W_enc, chunk_bytes=4 * V * 3, show_progress=False)  # 3 features a chunk
    for a, b in ((whole.dec.top_ids_SK, chunked.dec.top_ids_SK), (whole.enc.bottom_ids_SK, chunked.enc.bottom_ids_SK),
                 (whole.hist_SB, chunked.hist_SB)):
        assert torch.equal(a, b)
    torch.testing.assert_close(whole.skew_S, chunked.skew_S)
    full = output_weights(readout, W_dec).double().numpy()
    np.testing.assert_allclose(whole.skew_S.numpy(), scipy.stats.skew(full, axis=1), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(whole.kurtosis_S.numpy(), scipy.stats.kurtosis(full, axis=1), rtol=1e-3, atol=1e-4)
    for j in range(len(full)):
        counts, _ = np.histogram(full[j], bins=32, range=(full[j].min(), full[j].max()))
        assert np.abs(whole.hist_SB[j].numpy() - counts).sum() <= 2  # a value on a bin edge may fall either side
        assert whole.hist_SB[j].sum() == V
    tables = lens_tables(whole)
    assert len(tables["lens"]) == 7 * 2 * 20 and len(tables["lens_outputs"]) == V and len(tables["lens_stats"]) == 7
    assert {r[2] for r in tables["lens"]} == set(range(10)) | set(range(-10, 0))


def test_index_lens_skips_what_has_no_model(capsys):
    assert index_lens({"modality": "toy", "model": "toy"}, None) is None
    assert "toy store" in capsys.readouterr().err
    assert index_lens({"modality": "text", "model": "/nonexistent/model"}, None, "cpu") is None
    assert "lens skipped" in capsys.readouterr().err


def test_bad_shapes_are_refused(tiny_model_dir):
    readout = lens_readout(load_model(str(tiny_model_dir["gpt2"])))
    with pytest.raises(ValueError, match="d_in 7"):
        feature_lens(readout, torch.zeros(3, 7), torch.zeros(3, 7), show_progress=False)
    with pytest.raises(ValueError, match="must both be"):
        feature_lens(readout, torch.zeros(3, 32), torch.zeros(4, 32), show_progress=False)
