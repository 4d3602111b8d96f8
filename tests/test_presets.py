"""Model presets: align-base has HF's parameter count; every preset builds."""

from __future__ import annotations

import jax
import pytest
import torch
from transformers import AlignConfig, AlignModel

from align_jax.models import build_model, init_variables, presets


def _param_count(config) -> int:
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_align_base_has_hf_parameters_less_the_unused_pooler():
    with torch.device("meta"):
        hf = AlignModel(AlignConfig())
    named = dict(hf.named_parameters())
    pooler = sum(p.numel() for k, p in named.items() if k.startswith("text_model.pooler."))
    assert pooler == 768 * 768 + 768
    expected = sum(p.numel() for p in named.values()) - pooler
    assert _param_count(presets.align_base()) == expected
    assert 171e6 < expected < 173e6


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_embedding_width_and_projection(name):
    config = presets.get(name)
    model = build_model(config)
    shapes = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
    has_projection = "image_projection" in shapes["params"]
    assert has_projection == (model.image_tower.features != config.embed_dim)
    assert shapes["params"]["text_projection"]["kernel"].shape == (config.text.hidden_size, config.embed_dim)


def test_paper_configs():
    base, l2 = presets.align_base(), presets.align_l2()
    assert (base.image_size, base.max_text_length, base.embed_dim) == (289, 64, 640)
    assert (base.image.width_coefficient, base.image.depth_coefficient) == (2.0, 3.1)
    assert base.text.hidden_size == 768 and base.text.num_layers == 12
    assert (l2.image.width_coefficient, l2.image.depth_coefficient) == (4.3, 5.3)
    assert l2.text.hidden_size == 1024 and l2.text.num_layers == 24
    assert build_model(l2).image_tower.features == l2.embed_dim == 1376


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'huge'"):
        presets.get("huge")
