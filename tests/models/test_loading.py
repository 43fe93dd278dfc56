import pytest

from saex.models import load_model, parse_hook
from saex.models.hooks import HookPoint


def test_parse_hook():
    assert parse_hook("blocks.3.hook_resid_post", 6) == HookPoint(3, "hook_resid_post")
    assert parse_hook("blocks.0.hook_mlp_out", 1).order < parse_hook("blocks.0.hook_resid_post", 1).order


@pytest.mark.parametrize("name, match", [
    ("blocks.6.hook_resid_post", r"layer 6 does not exist; this model has layers 0\.\.5"),
    ("blocks.2.hook_attn_in", r"unknown site 'hook_attn_in'; valid sites: \['hook_resid_pre', 'hook_attn_out', 'hook_mlp_in'"),
    ("layer3", r"not of the form blocks\.<layer>\.<site>"),
])
def test_bad_hook_errors(name, match):
    with pytest.raises(ValueError, match=match):
        parse_hook(name, 6)


def test_unknown_model_lists_the_zoo(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model': not a zoo model \(minilm, fmnist-vit\)"):
        load_model("no-such-model")


def test_unsupported_family(tmp_path):
    import transformers as T

    T.ResNetModel(T.ResNetConfig(hidden_sizes=[8], depths=[1], embedding_size=8)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model type 'resnet' is not supported; supported model types: \["):
        load_model(str(tmp_path))


def test_zoo_models_load():
    vit = load_model("fmnist-vit")
    assert vit.family.name == "vit" and vit.modality == "image" and vit.num_channels == 1
    assert vit.model.config.id2label[0] == "T-shirt/top"
