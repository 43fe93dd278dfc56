import pytest

from saex.models import load_model


def test_text_content_tokens_exclude_padding_and_special(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["bert"]))
    texts = ["a b c", "a much longer sentence than the first one"]
    batch = adapter.prepare(texts)
    T = batch.inputs["input_ids"].shape[1]
    mask = adapter.select(batch, T, "content")
    tok = adapter.processor
    for i, text in enumerate(texts):
        plain = tok(text, add_special_tokens=False)["input_ids"]
        assert batch.token_ids_BT[i][mask[i]].tolist() == plain
    all_mask = adapter.select(batch, T, "all")
    assert all_mask.sum(1).tolist() == [len(tok(t)["input_ids"]) for t in texts]
    first = adapter.select(batch, T, "first")
    assert first.sum().item() == 2 and first[:, 0].all()


def test_image_token_selection(tiny_model_dir):
    from PIL import Image

    adapter = load_model(str(tiny_model_dir["vit"]))
    batch = adapter.prepare([Image.new("RGB", (32, 32))] * 2)
    T = 1 + (32 // 8) ** 2
    assert adapter.select(batch, T, "cls").sum(1).tolist() == [1, 1]
    assert adapter.select(batch, T, "patches").sum(1).tolist() == [T - 1] * 2
    assert adapter.select(batch, T, "all").sum(1).tolist() == [T] * 2


def test_siglip_has_no_cls(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["siglip"]))
    with pytest.raises(ValueError, match="no class token"):
        adapter.check_tokens("cls")
    assert adapter.check_tokens("patches") == "patches"


def test_bad_token_selection_names_the_valid_ones(tiny_model_dir):
    adapter = load_model(str(tiny_model_dir["bert"]))
    with pytest.raises(ValueError, match=r"'patches'.*valid: \['content', 'all', 'first'\]"):
        adapter.check_tokens("patches")
