"""saex and SAELens read each other's SAEs and compute the same codes and reconstructions.

SAELens' own SAE classes, with random weights and each config field that changes the computation, are saved
with SAELens' save_model and loaded with saex's load_sae; saex must compute what SAELens computes (to 1e-5
relative) or refuse the folder naming the field."""

import json

import pytest
import torch

from saex.sae.io import load_sae, save_sae
from tests.sae.random_sae import random_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (the `interop` extra: pip install 'saex[interop]')")

D_IN, D_SAE = 16, 48
SAELENS = {"standard": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE"}


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated", "prolu"])
def test_saelens_loads_saex_saes(arch, tmp_path):
    sae = random_sae(arch, 16, 48, 6)
    save_sae(sae, tmp_path / arch, {"model": "minilm", "hook": "blocks.3.hook_resid_post"})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch), device="cpu")
    x = torch.randn(20, 16)
    ours_f = sae.encode(x).dense()
    their_f = theirs.encode(x)
    assert (their_f != 0).sum() > 0
    torch.testing.assert_close(their_f, ours_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(their_f), sae(x), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert load_sae(tmp_path / arch).cfg.architecture == arch  # and saex reads back its own architecture


@pytest.mark.parametrize("arch, skip, theirs", [("relu", False, "Transcoder"), ("relu", True, "SkipTranscoder"),
                                                ("jumprelu", False, "JumpReLUTranscoder"),
                                                ("jumprelu", True, "JumpReLUSkipTranscoder")])
def test_saelens_loads_saex_transcoders(arch, skip, theirs, tmp_path):
    sae = random_sae(arch, 16, 48, 6, transcoder=True, d_out=12, skip=skip)
    save_sae(sae, tmp_path / "t", {"hook": "blocks.1.hook_mlp_in", "target_hook": "blocks.1.hook_mlp_out"})
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "t"), device="cpu")
    assert type(loaded).__name__ == theirs and loaded.cfg.d_out == 12
    x = torch.randn(20, 16)
    with torch.no_grad():
        their_f, ours_f = loaded.encode(x), sae.encode(x).dense()
        assert (their_f != 0).sum() > 0
        torch.testing.assert_close(their_f, ours_f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(x), sae(x), atol=1e-5, rtol=1e-5)
    back = load_sae(tmp_path / "t")  # and saex reads its own back
    assert back.cfg.transcoder and back.cfg.skip == skip and back.d_out == 12
    torch.testing.assert_close(back(x), sae(x), atol=1e-6, rtol=1e-6)


def test_saex_reads_saelens_transcoders(tmp_path):
    cfg = sae_lens.SkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=10, apply_b_dec_to_input=False)
    theirs = sae_lens.SkipTranscoder(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    ours = load_sae(_saved(theirs, tmp_path / "s"))
    assert ours.cfg.transcoder and ours.cfg.skip and ours.cfg.architecture == "relu"
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        assert _rel_err(ours(x), theirs(x)) <= 1e-5 and _rel_err(ours.encode(x).dense(), theirs.encode(x)) <= 1e-5


def _saelens_sae(arch: str, seed: int = 0, **fields):
    """A SAELens inference SAE with random weights that make each field matter: encoder biases, decoder rows of
    unequal norms, JumpReLU thresholds of both signs."""
    torch.manual_seed(seed)
    cfg_cls = getattr(sae_lens, SAELENS[arch] + "Config")
    if arch == "topk":
        fields.setdefault("k", 5)
    sae = getattr(sae_lens, SAELENS[arch])(cfg_cls(d_in=D_IN, d_sae=D_SAE, **fields))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.25 if p.ndim == 2 else 0.5))
        sae.W_dec.mul_(torch.empty(D_SAE, 1).uniform_(0.2, 3.0))
        if arch == "jumprelu":
            sae.threshold.uniform_(-0.3, 0.6)
    return sae


def _saved(sae, path):
    sae.save_model(str(path))
    return path


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _assert_same(folder, theirs=None, x=None):
    """saex's load of `folder` encodes and reconstructs as SAELens' own load of it (or `theirs`)."""
    theirs = theirs or sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    ours = load_sae(folder)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 2 if x is None else x
    with torch.no_grad():
        their_f, their_out = theirs.encode(x.to(theirs.dtype)).double(), theirs(x.to(theirs.dtype)).double()
        our_f, our_out = ours.encode(x).dense().double(), ours(x).double()
    assert (their_f != 0).any(dim=0).float().mean() > 0.3  # many latents fire somewhere
    assert torch.equal(our_f != 0, their_f != 0)  # the same latents fire (TopK: the same selection)
    assert _rel_err(our_f, their_f) <= 1e-5 and _rel_err(our_out, their_out) <= 1e-5
    return ours


@pytest.mark.parametrize("arch", sorted(SAELENS))
def test_apply_b_dec_to_input_false_is_folded(arch, tmp_path):
    _assert_same(_saved(_saelens_sae(arch, apply_b_dec_to_input=False), tmp_path / "s"))


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_topk_rescale_acts_by_decoder_norm_is_folded(apply_b_dec, tmp_path):
    sae = _saelens_sae("topk", rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=apply_b_dec)
    _assert_same(_saved(sae, tmp_path / "s"))


@pytest.mark.parametrize("k", [1, 5, 17])
def test_topk_k(k, tmp_path):
    assert _assert_same(_saved(_saelens_sae("topk", k=k), tmp_path / "s")).cfg.k == k


def test_jumprelu_thresholds_of_both_signs(tmp_path):
    """SAELens' JumpReLU is ReLU(z) 1[z > theta]: a negative threshold lets no negative z through."""
    sae = _saelens_sae("jumprelu")
    assert (sae.threshold < 0).sum() > 5
    _assert_same(_saved(sae, tmp_path / "s"))


def test_gated_magnitude_path(tmp_path):
    ours = _assert_same(_saved(_saelens_sae("gated"), tmp_path / "s"))
    assert ours.cfg.architecture == "gated" and ours.arch.r_mag.abs().max() > 0


@pytest.mark.parametrize("arch", ["standard", "topk"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_dtype(arch, dtype, tmp_path):
    """saex computes in float32 from the stored weights: SAELens' float32 load of the same weights, to 1e-5."""
    folder = _saved(_saelens_sae(arch, dtype=dtype), tmp_path / "s")
    assert json.loads((folder / "cfg.json").read_text())["dtype"] == dtype
    _assert_same(folder, sae_lens.SAE.load_from_disk(str(folder), device="cpu", dtype="float32"))


def _refused(folder, *words):
    with pytest.raises(ValueError) as e:
        load_sae(folder)
    assert str(folder / "cfg.json") in str(e.value)
    for word in words:
        assert word in str(e.value)


@pytest.mark.parametrize("norm", ["expected_average_only_in", "constant_norm_rescale", "layer_norm",
                                  "covariance_whitening"])
def test_normalize_activations_is_refused(norm, tmp_path):
    folder = _saved(_saelens_sae("standard", normalize_activations=norm), tmp_path / "s")
    sae_lens.SAE.load_from_disk(str(folder), device="cpu")  # SAELens reads it
    _refused(folder, f"normalize_activations={norm!r}", "normalize_activations='none'")


def test_hook_z_reshaping_is_refused(tmp_path):
    folder = _saved(_saelens_sae("standard", reshape_activations="hook_z"), tmp_path / "s")
    sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    _refused(folder, "reshape_activations='hook_z'", "reshape_activations='none'")


def test_hook_head_index_is_refused(tmp_path):
    folder = _saved(_saelens_sae("standard"), tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_head_index"] = 3
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert sae_lens.SAE.load_from_disk(str(folder), device="cpu").cfg.metadata.hook_head_index == 3
    _refused(folder, "hook_head_index=3")


def test_architectures_saex_lacks_are_refused(tmp_path):
    sae = sae_lens.AbsTopKSAE(sae_lens.AbsTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    _refused(_saved(sae, tmp_path / "s"), "architecture 'abstopk'", "'gated', 'jumprelu', 'standard', 'topk'")


def _pre_6(folder, **fields):
    """`folder`'s config rewritten as SAELens 5 wrote it: no sae_lens_version, LLM fields at the top level."""
    cfg = json.loads((folder / "cfg.json").read_text())
    old = {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input")}
    (folder / "cfg.json").write_text(json.dumps({**old, "hook_name": "blocks.0.hook_resid_post",
                                                 "model_name": "gpt2", "normalize_activations": False, **fields}))
    return folder


def test_pre_6_topk_config(tmp_path):
    """SAELens 5 named a TopK by its activation function; read as SAELens 6 reads it."""
    folder = _pre_6(_saved(_saelens_sae("topk", k=4), tmp_path / "s"), architecture="standard",
                    activation_fn="topk", activation_fn_kwargs={"k": 4})
    assert sae_lens.SAE.load_from_disk(str(folder), device="cpu").cfg.architecture() == "topk"
    assert _assert_same(folder).cfg.architecture == "topk"


def test_pre_6_fields_that_change_the_computation_are_refused(tmp_path):
    folder = _saved(_saelens_sae("standard"), tmp_path / "s")
    _refused(_pre_6(folder, activation_fn="tanh-relu"), "activation_fn='tanh-relu'")
    _refused(_pre_6(folder, hook_point_head_index=2), "hook_head_index=2")
    _refused(_pre_6(folder, normalize_activations=True), "normalize_activations='expected_average_only_in'")
    _assert_same(_pre_6(folder))
