"""Image inputs: prepare() does the processor's integer work (uint8 pixels), on_device() the float work;
together they give exactly the processor's own output."""

import numpy as np
import pytest
import torch
from PIL import Image

from saex.models import load_model


def _images(n=3, size=(45, 37)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("family", ["clip", "vit", "dinov2", "siglip"])
def test_split_preprocessing_equals_the_processor(tiny_model_dir, family):
    adapter = load_model(str(tiny_model_dir[family]), device="cpu")
    images = _images()
    batch = adapter.prepare(images)
    assert batch.inputs["pixel_values"].dtype == torch.uint8
    pixels = adapter.on_device(batch).inputs["pixel_values"]
    expected = adapter.processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.dtype == adapter.dtype and pixels.shape == expected.shape
    assert torch.allclose(pixels, expected, atol=1e-5)


def test_zoo_grayscale_model_gets_the_processor_pixels():
    adapter = load_model("fmnist-vit", device="cpu")
    images = [im.convert("L") for im in _images(size=(28, 28))]
    pixels = adapter.on_device(adapter.prepare(images)).inputs["pixel_values"]
    expected = adapter.processor(images=images, return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, expected, atol=1e-5)
