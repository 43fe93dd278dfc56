import dataclasses
import json

import pytest
import torch

from saex.sae import SAE, Code, SAEConfig
from saex.sae.arch import TrainContext
from saex.sae.arch.matryoshka import prefix_ends
from saex.sae.init import geometric_median, input_scale
from saex.sae.io import load_sae, save_sae
from saex.train.optim import make_adam, permute_latents

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated", "prolu"]


def _sae(arch, **kw):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, architecture=arch, k=5, **kw))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        for p in sae.arch.parameters():
            p.uniform_(0.01, 0.05)
    return sae


def _train_a_bit(sae, steps=3):
    opt = make_adam(sae.parameters(), 1e-2)
    for _ in range(steps):
        out = sae.train_forward(torch.randn(64, 12), TrainContext(1.0, torch.zeros(40, dtype=torch.bool)))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sae.arch.after_optimizer_step(sae)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_is_forward_and_dense_roundtrips(arch):
    sae = _sae(arch)
    x = torch.randn(9, 12)
    code = sae.encode(x)
    dense = code.dense()
    assert torch.allclose(sae.decode(code), dense @ sae.W_dec + sae.b_dec, atol=1e-5)
    assert torch.equal(sae(x), sae.decode(code))
    assert torch.equal(Code.from_dense(dense).dense(), dense)
    assert (dense >= 0).all()


def test_topk_keeps_exactly_k_and_batchtopk_k_times_batch():
    x = torch.randn(16, 12)
    topk, batch = _sae("topk"), _sae("batchtopk")
    with torch.no_grad():
        topk.b_enc.fill_(5.0)  # every pre-activation positive: exactly k survive
        batch.b_enc.fill_(5.0)
    assert topk.encode(x).l0().tolist() == [5] * 16
    out = batch.train_forward(x, TrainContext())
    assert out.l0.item() == pytest.approx(5.0)
    assert batch.arch.threshold > 0  # running estimate of the smallest kept activation


@pytest.mark.parametrize("arch", ARCHS)
def test_input_scale_folds_into_the_weights(arch):
    sae = _sae(arch)
    x = torch.randn(9, 12) * 7
    s = 0.3
    expected = sae(x * s) / s
    codes = sae.encode(x * s).dense()
    sae.fold_input_scale(s)
    assert torch.allclose(sae(x), expected, atol=1e-5)
    assert torch.allclose(sae.encode(x).dense(), codes, atol=1e-5)


def test_classic_relu_keeps_unit_norm_decoder_rows():
    sae = _sae("relu", l1_variant="classic")
    _train_a_bit(sae)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-5)


def test_april_l1_is_weighted_by_decoder_norms():
    sae = _sae("relu")
    x = torch.randn(5, 12)
    out = sae.train_forward(x, TrainContext(sparsity_coefficient=2.0))
    f = torch.relu(sae.pre_acts(x)).detach()
    assert out.losses["sparsity"].item() == pytest.approx(2.0 * float((f * sae.W_dec.detach().norm(dim=1)).sum(1).mean()), rel=1e-5)


def test_auxk_and_ghost_grads_only_with_dead_latents():
    dead = torch.zeros(40, dtype=torch.bool)
    dead[:10] = True
    x = torch.randn(8, 12)
    assert "auxk" in _sae("topk").train_forward(x, TrainContext(0.0, dead)).losses
    assert "auxk" not in _sae("topk").train_forward(x, TrainContext(0.0, torch.zeros(40, dtype=torch.bool))).losses
    ghost = _sae("relu", ghost_grads=True).train_forward(x, TrainContext(1.0, dead)).losses["ghost"]
    ghost.backward()
    # the host counted dead latents that have since revived: the terms are there, and zero
    none = torch.zeros(40, dtype=torch.bool)
    for arch, term in (("topk", "auxk"), ("relu", "ghost")):
        sae = _sae(arch, ghost_grads=True) if arch == "relu" else _sae(arch)
        assert sae.train_forward(x, TrainContext(1.0, none, n_dead=10)).losses[term] == 0
    sparse_relu = _sae("relu", ghost_grads=True)
    sparse_relu.arch.recent_l0.zero_()  # ghost grads need every dead latent's z: the dense path serves
    assert "ghost" in sparse_relu.train_forward(x, TrainContext(1.0, dead)).losses


def test_matryoshka_prefixes():
    cfg = SAEConfig(d_in=4, d_sae=64, architecture="topk", matryoshka="fixed")
    assert prefix_ends(cfg, 64, TrainContext()) == [4, 8, 16, 32, 64]
    cfg.matryoshka = "random"
    ends = prefix_ends(cfg, 64, TrainContext(generator=torch.Generator().manual_seed(0)))
    assert ends[-1] == 64 and ends == sorted(set(ends))


@pytest.mark.parametrize("mode", ["fixed", "random"])
def test_matryoshka_loss_equals_one_masked_decode_per_prefix(mode):
    from saex.sae.arch.matryoshka import matryoshka_loss

    sae = _sae("topk", matryoshka=mode)
    x = torch.randn(9, 12)
    code = sae.encode(x)
    code.values_BK.requires_grad_()
    ends = prefix_ends(sae.cfg, sae.d_sae, TrainContext(generator=torch.Generator().manual_seed(3)))
    expected = torch.stack([(x - (code.dense() * (torch.arange(sae.d_sae) < e)) @ sae.W_dec - sae.b_dec)
                            .pow(2).sum(-1).mean() for e in ends]).mean()
    got = matryoshka_loss(sae, x, code.bags(), sae.cfg, TrainContext(generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(got, expected, atol=1e-5)
    g1, = torch.autograd.grad(got, code.values_BK)
    g2, = torch.autograd.grad(expected, code.values_BK)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_permuting_latents_keeps_the_function_and_moves_adam_state():
    sae = _sae("topk", matryoshka="fixed")
    opt = make_adam(sae.parameters(), 1e-2)
    out = sae.train_forward(torch.randn(32, 12), TrainContext())
    out.loss.backward()
    opt.step()
    x = torch.randn(6, 12)
    before, moments = sae(x), opt.state[sae.W_dec]["exp_avg"].clone()
    perm = torch.randperm(40)
    permute_latents(opt, sae.latent_parameters(), perm)
    sae.permute_latents(perm)
    assert torch.allclose(sae(x), before, atol=1e-6)
    assert torch.equal(opt.state[sae.W_dec]["exp_avg"], moments[perm])


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(arch, tmp_path):
    sae = _sae(arch)
    _train_a_bit(sae)
    sae.eval()
    save_sae(sae, tmp_path / "s", {"model": "m", "hook": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 40 and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    loaded = load_sae(tmp_path / "s")
    x = torch.randn(9, 12)
    assert torch.allclose(loaded(x), sae(x), atol=1e-6)
    assert torch.equal(loaded.encode(x).dense(), sae.encode(x).dense())


def test_saelens_folder_without_saex_fields_loads(tmp_path):
    sae = _sae("jumprelu")
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del cfg["saex"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "s")
    x = torch.randn(4, 12)
    assert loaded.cfg.architecture == "jumprelu" and torch.allclose(loaded(x), sae(x), atol=1e-6)


def test_sparsify_folder_loads(tmp_path):
    from safetensors.torch import save_file

    w_enc, b_enc = torch.randn(40, 12), torch.randn(40)
    w_dec, b_dec = torch.randn(40, 12), torch.randn(12)
    (tmp_path / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 3, "num_latents": 40, "d_in": 12}))
    save_file({"encoder.weight": w_enc, "encoder.bias": b_enc, "W_dec": w_dec, "b_dec": b_dec}, tmp_path / "sae.safetensors")
    sae = load_sae(tmp_path)
    x = torch.randn(5, 12)
    z = torch.relu((x - b_dec) @ w_enc.T + b_enc)  # sparsify's encoder: ReLU, then top-k
    vals, idx = z.topk(3)
    expected = torch.zeros(5, 40).scatter(1, idx, vals) @ w_dec + b_dec
    assert torch.allclose(sae(x), expected, atol=1e-5)


def test_geometric_median_and_input_scale():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    gm = geometric_median(pts)
    # the median resists the outlier: it lies near the three clustered points, unlike the mean
    assert gm.norm() < 1.0 < pts.mean(0).norm()
    x = torch.randn(1000, 16) * 5
    assert float((x * input_scale(x)).norm(dim=1).mean()) == pytest.approx(4.0, rel=1e-5)


def test_bad_config_errors():
    with pytest.raises(ValueError, match=r"k must lie in \[1, d_sae=8\], got 9"):
        SAE(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=9))
    with pytest.raises(ValueError, match="matryoshka works with topk or batchtopk, not 'relu'"):
        SAE(SAEConfig(d_in=4, d_sae=8, architecture="relu", matryoshka="fixed"))
    with pytest.raises(ValueError, match="matryoshka_groups must sum to 1"):
        SAE(dataclasses.replace(SAEConfig(d_in=4, d_sae=8, k=2, matryoshka="fixed"), matryoshka_groups=[0.5, 0.2]))


def _saved(arch, tmp_path):
    sae = _sae(arch)
    _train_a_bit(sae)
    return save_sae(sae.eval(), tmp_path / arch)


def _edit(folder, cfg=None, tensors=None, drop=()):
    """Rewrite a saved SAE's cfg.json (keys set, None deletes) and tensors (replaced, added or dropped)."""
    from safetensors.torch import load_file, save_file

    if cfg:
        data = json.loads((folder / "cfg.json").read_text())
        for key, value in cfg.items():
            data.pop(key) if value is None else data.__setitem__(key, value)
        (folder / "cfg.json").write_text(json.dumps(data))
    if tensors or drop:
        weights = {**load_file(folder / "sae_weights.safetensors"), **(tensors or {})}
        save_file({k: v for k, v in weights.items() if k not in drop}, folder / "sae_weights.safetensors")
    return folder


def _refused(folder, file, *words):
    with pytest.raises(ValueError) as e:
        load_sae(folder)
    assert str(folder / file) in str(e.value), e.value
    for word in words:
        assert word in str(e.value), e.value


def test_truncated_weights_are_refused_naming_the_file(tmp_path):
    folder = _saved("topk", tmp_path)
    path = folder / "sae_weights.safetensors"
    data = path.read_bytes()
    for cut in (len(data) - 3, 200, 5):
        path.write_bytes(data[:cut])
        _refused(folder, "sae_weights.safetensors", "truncated")


def test_a_wrong_width_names_the_tensor_and_the_shape_it_needs(tmp_path):
    folder = _edit(_saved("relu", tmp_path), cfg={"d_in": 13, "saex": None})
    _refused(folder, "sae_weights.safetensors", "W_enc has shape [12, 40]", "d_in=13 and d_sae=40 need [13, 40]")


def test_missing_and_extra_tensors_name_them_and_the_architecture(tmp_path):
    _refused(_edit(_saved("gated", tmp_path), drop=["r_mag"]), "sae_weights.safetensors", "'gated' SAE", "lacks ['r_mag']")
    jumprelu = _edit(_saved("jumprelu", tmp_path), cfg={"architecture": "topk", "k": 5})  # threshold left over
    _refused(jumprelu, "sae_weights.safetensors", "'topk' SAE", "also has ['threshold']", "another architecture")
    _refused(_edit(_saved("relu", tmp_path), tensors={"W_skip": torch.zeros(12, 12)}), "sae_weights.safetensors",
             "also has ['W_skip']")


def test_the_architecture_must_be_the_one_saex_saved(tmp_path):
    folder = _edit(_saved("topk", tmp_path), cfg={"architecture": "standard"})  # same tensors, other computation
    _refused(folder, "cfg.json", "architecture is 'standard'", "'topk' SAE, saved with architecture 'topk'")
    _refused(_edit(_saved("relu", tmp_path), cfg={"k": 4, "architecture": "topk"}), "cfg.json", "'relu' SAE")
    folder = _saved("topk", tmp_path / "k")
    _refused(_edit(folder, cfg={"k": 4}), "cfg.json", "k is 4", "saved with k 5")


def test_invalid_or_incomplete_cfg_json_is_refused(tmp_path):
    folder = _saved("relu", tmp_path)
    (folder / "cfg.json").write_text('{"architecture": "standard", "d_in": 12,')
    _refused(folder, "cfg.json", "not valid JSON")
    (folder / "cfg.json").write_bytes(b'{"architecture": "\xff"}')
    _refused(folder, "cfg.json", "not UTF-8")
    (folder / "cfg.json").write_text("[1, 2]")
    _refused(folder, "cfg.json", "JSON list", "must be a JSON object")
    folder = _saved("relu", tmp_path / "b")
    _refused(_edit(folder, cfg={"d_sae": None}), "cfg.json", "'d_sae' is missing", "an integer")
    _refused(_edit(folder, cfg={"d_sae": "40"}), "cfg.json", "d_sae is '40'", "an integer")
    _refused(_edit(folder, cfg={"d_sae": 40, "dtype": "int8"}), "cfg.json", "dtype 'int8'", "float32")
    _refused(_edit(folder, cfg={"dtype": "float32", "saex": {"sae": {"d_in": 12, "d_sae": 40, "k": "five"}}}),
             "cfg.json", "saex.sae.k is 'five'", "an integer")
    _refused(_edit(folder, cfg={"saex": {"sae": {"d_in": 12, "d_sae": 40, "architecture": "relu",
                                                 "encoder_kernel": "fast"}}}),
             "cfg.json", "saex.sae.encoder_kernel is 'fast'", "one of ['sparse', 'dense']")
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors is missing"):
        (folder / "sae_weights.safetensors").unlink()
        load_sae(folder)
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        load_sae(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.float16])
def test_tensors_in_another_dtype_than_the_cfg_are_refused(dtype, tmp_path):
    folder = _edit(_saved("relu", tmp_path), tensors={"b_dec": torch.zeros(12, dtype=dtype)})
    _refused(folder, "sae_weights.safetensors", "tensor b_dec is stored as", "it must be float32")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e12])
def test_non_finite_or_absurd_weights_are_refused_naming_the_tensor(value, tmp_path):
    folder = _saved("jumprelu", tmp_path)
    _edit(folder, tensors={"threshold": torch.full((40,), 0.1).index_fill(0, torch.tensor([7]), value)})
    _refused(folder, "sae_weights.safetensors", "tensor threshold")
    _edit(_saved("gated", tmp_path / "g"), tensors={"r_mag": torch.full((40,), 200.0)})  # exp(200) overflows
    _refused(tmp_path / "g" / "gated", "sae_weights.safetensors", "tensor r_mag")


def test_batchtopk_threshold_must_be_one_value(tmp_path):
    folder = _saved("batchtopk", tmp_path)
    _edit(folder, tensors={"threshold": torch.linspace(0.1, 0.2, 40)})
    _refused(folder, "sae_weights.safetensors", "40 different values")


def test_prolu_is_saved_as_the_jumprelu_it_equals_and_old_prolu_folders_load(tmp_path):
    sae = _sae("prolu")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # both signs: max(-b, 0) clips the positive ones
    folder = save_sae(sae.eval(), tmp_path / "new")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["saex"]["sae"]["architecture"] == "prolu"
    x = torch.randn(30, 12)
    assert torch.equal(load_sae(folder).encode(x).dense(), sae.encode(x).dense())
    from safetensors.torch import save_file  # saex before: architecture "prolu", b_enc as trained

    old = tmp_path / "old"
    old.mkdir()
    save_file({"W_enc": sae.W_enc.detach().contiguous(), "b_enc": sae.b_enc.detach(), "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}, old / "sae_weights.safetensors")
    (old / "cfg.json").write_text(json.dumps({**cfg, "architecture": "prolu"}))
    assert torch.equal(load_sae(old)(x), sae(x))
    _refused(_edit(folder, tensors={"b_enc": torch.ones(40)}), "sae_weights.safetensors", "b_enc all zeros")
