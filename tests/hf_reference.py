"""Tiny randomly initialised HF `AlignModel`s used as numerical references (torch, tests only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AlignConfig, AlignModel, BertTokenizer

from tests import fixtures

# Two shapes of model: an odd image size (HF's asymmetric padding differs from symmetric there),
# and custom stages with a square-padded depthwise block, max pooling and the tanh GELU.
HF_CONFIGS = {
    "odd": dict(
        vision_config=dict(width_coefficient=0.25, depth_coefficient=0.5, image_size=33),
        text_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
        ),
        projection_dim=80,
    ),
    "custom": dict(
        vision_config=dict(
            width_coefficient=0.5,
            depth_coefficient=1.0,
            image_size=40,
            kernel_sizes=[3, 5, 3, 5],
            in_channels=[32, 16, 24, 40],
            out_channels=[16, 24, 40, 80],
            strides=[1, 2, 2, 2],
            num_block_repeats=[1, 2, 1, 2],
            expand_ratios=[1, 6, 4, 6],
            depthwise_padding=[3],
            pooling_type="max",
        ),
        text_config=dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=3,
            intermediate_size=96,
            max_position_embeddings=40,
            hidden_act="gelu_new",
        ),
        projection_dim=40,
        temperature_init_value=0.5,
    ),
}


def realistic_init_(model: AlignModel, seed: int) -> None:
    """HF's default init makes tiny models underflow (normalised embeddings become NaN):
    He-normal weights, BatchNorm statistics and affine terms near but not at identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "temperature":
                p.fill_(0.07)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    calibrate_batchnorm_(model, seed)


def calibrate_batchnorm_(model: AlignModel, seed: int) -> None:
    """Sets BatchNorm running statistics to those of random images, so activations keep their
    scale through the blocks and the embeddings depend on the input."""
    size = model.config.vision_config.image_size
    images = fixtures.random_images(16, size, seed=seed + 100)
    pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
        m.train()
    with torch.no_grad():
        model.vision_model(pixel_values=pixels)
    model.eval()


def build_hf_model(name: str, directory: Path, seed: int = 0) -> AlignModel:
    """Saves a tiny HF ALIGN model plus vocab to `directory` (as `save_pretrained` does)."""
    kwargs = dict(HF_CONFIGS[name])
    kwargs["text_config"] = dict(kwargs["text_config"], vocab_size=len(fixtures.TEST_VOCAB) + 3)
    model = AlignModel(AlignConfig(**kwargs)).eval()
    realistic_init_(model, seed)
    model.save_pretrained(directory)
    vocab = fixtures.write_vocab(directory / "vocab.txt")
    BertTokenizer(vocab, do_lower_case=True).save_pretrained(directory)
    return model


def hf_embeddings(model: AlignModel, images: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray):
    """Normalised image and text embeddings and `logits_per_image`, as NumPy."""
    pixels = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(
            pixel_values=pixels,
            input_ids=torch.from_numpy(input_ids.astype(np.int64)),
            attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
        )
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
    image = (image_features / image_features.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(image, out.image_embeds.numpy(), atol=1e-6)
    return image, out.text_embeds.numpy(), out.logits_per_image.numpy()
