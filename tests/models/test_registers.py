"""DINOv2 with registers: [CLS], then the register tokens, then the patches; `patches` holds the patch
tokens only and `registers` the registers, each against transformers' own output_hidden_states."""

import numpy as np
import pytest
import torch
from PIL import Image

from saex.cli import main
from saex.data import open_dataset
from saex.models import load_model
from saex.store import ActivationStore

R, P = 4, (32 // 8) ** 2  # the tiny model's registers and patches
BF16 = dict(rtol=2 ** -7, atol=1e-2)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40 + 7 * i, 36, 3)) * 255).astype("uint8")) for i in range(3)]


@pytest.fixture
def adapter(tiny_model_dir):
    return load_model(str(tiny_model_dir["dinov2_with_registers"]))


def test_selections_match_hidden_states_exactly(adapter):
    assert (adapter.family.name, adapter.n_registers) == ("dinov2_with_registers", R)
    assert adapter.token_choices() == ["cls", "patches", "registers", "all"]
    batch = adapter.prepare(_images())
    with torch.no_grad():
        hidden = adapter.backbone(**adapter.on_device(batch).inputs, output_hidden_states=True).hidden_states
    assert hidden[0].shape[1] == 1 + R + P
    # transformers' own layout, as its backbone slices it: [CLS] | registers | patches
    where = {"cls": slice(0, 1), "registers": slice(1, 1 + R), "patches": slice(1 + R, None), "all": slice(None)}
    for layer in range(adapter.n_layers - 1):
        hook = f"blocks.{layer}.hook_resid_post"
        acts = adapter.capture(batch, [adapter.hook(hook)])[hook]
        for tokens, span in where.items():
            mask = adapter.select(batch, acts.shape[1], tokens)
            assert torch.equal(acts[mask], hidden[layer + 1][:, span].reshape(-1, adapter.d_model)), (layer, tokens)
    # what enters block 0: the register rows are the learnt register tokens themselves (no position embedding)
    acts = adapter.capture(batch, [adapter.hook("blocks.0.hook_resid_pre")])["blocks.0.hook_resid_pre"]
    registers = acts[adapter.select(batch, acts.shape[1], "registers")].reshape(len(_images()), R, -1)
    assert torch.equal(registers, adapter.backbone.embeddings.register_tokens.expand(len(_images()), -1, -1))


def test_registers_are_refused_elsewhere_naming_the_model_and_valid_selections(tiny_model_dir):
    vit = load_model(str(tiny_model_dir["vit"]))
    with pytest.raises(ValueError, match=r"'registers' is not valid for .*vit \(vit, which has no register tokens\); "
                                         r"valid: \['cls', 'patches', 'all'\]"):
        vit.check_tokens("registers")
    siglip = load_model(str(tiny_model_dir["siglip"]))
    with pytest.raises(ValueError, match=r"siglip, which has no class token\); valid: \['patches', 'all'\]"):
        siglip.check_tokens("cls")
    bert = load_model(str(tiny_model_dir["bert"]))
    with pytest.raises(ValueError, match=r"bert, which reads text\); valid: \['content', 'all', 'first'\]"):
        bert.check_tokens("registers")


@pytest.mark.parametrize("tokens, positions", [("patches", range(1 + R, 1 + R + P)), ("registers", range(1, 1 + R)),
                                               ("all", range(1 + R + P))])
def test_harvest_stores_each_selection_with_its_positions(tokens, positions, tmp_path, tiny_model_dir, adapter):
    run = tmp_path / tokens
    assert main(["harvest", "--run", str(run), "--model", str(tiny_model_dir["dinov2_with_registers"]),
                 "--dataset", "fashion-mnist", "--order", "dataset", "--max-examples", "3", "--tokens", tokens,
                 "--hook", "blocks.1.hook_resid_post"]) == 0
    store = ActivationStore(run / "acts")
    assert store.manifest["tokens"] == tokens
    rows = next(store.iter_ordered(["acts.blocks.1.hook_resid_post", "example", "position"], len(store)))
    assert rows["example"].tolist() == [i for i in range(3) for _ in positions]
    assert rows["position"].tolist() == list(positions) * 3
    fm = open_dataset("fashion-mnist")
    batch = adapter.prepare([fm[i].input for i in range(3)])
    with torch.no_grad():
        hidden = adapter.backbone(**adapter.on_device(batch).inputs, output_hidden_states=True).hidden_states[2]
    expected = hidden[:, positions.start:positions.stop].reshape(-1, adapter.d_model)
    torch.testing.assert_close(rows["acts.blocks.1.hook_resid_post"].float(), expected, **BF16)
