"""Converts a Hugging Face ALIGN directory (config.json, model.safetensors, vocab.txt) into an
align_jax checkpoint that `align_jax.inference.load` opens.

    python -m align_jax.tools.convert_hf --hf_dir ~/align-base --output ~/align-base-jax

Reads safetensors with NumPy only: no torch, no pickle.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file

from align_jax import checkpointing
from align_jax.input.text_ops import check_vocab, read_vocab
from align_jax.models import build_model, init_variables
from align_jax.models.bert import ACTIVATIONS as TEXT_ACTIVATIONS
from align_jax.models.efficientnet import ACTIVATIONS as IMAGE_ACTIVATIONS
from align_jax.models.efficientnet import BASE_STAGES
from align_jax.models.presets import BERT_VOCAB_SIZE, model_config

# HF writes only the fields that differ from its defaults, so the defaults are needed to read a
# config.json (transformers' AlignVisionConfig / AlignTextConfig / AlignConfig).
HF_VISION_DEFAULTS = dict(
    num_channels=3,
    image_size=600,
    width_coefficient=2.0,
    depth_coefficient=3.1,
    depth_divisor=8,
    **BASE_STAGES,
    depthwise_padding=[],
    squeeze_expansion_ratio=0.25,
    hidden_act="swish",
    pooling_type="mean",
    batch_norm_eps=1e-3,
    drop_connect_rate=0.2,
)
HF_TEXT_DEFAULTS = dict(
    vocab_size=BERT_VOCAB_SIZE,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    position_embedding_type="absolute",
)
HF_DEFAULTS = dict(projection_dim=640, temperature_init_value=1.0)
DEFAULT_MAX_TEXT_LENGTH = 64  # the align-base processor pads to 64

# Our module names -> HF module names.
_IMAGE_MODULES = {
    "stem_conv": "embeddings.convolution",
    "stem_bn": "embeddings.batchnorm",
    "expand_conv": "expansion.expand_conv",
    "expand_bn": "expansion.expand_bn",
    "depthwise_conv": "depthwise_conv.depthwise_conv",
    "depthwise_bn": "depthwise_conv.depthwise_norm",
    "se_reduce": "squeeze_excite.reduce",
    "se_expand": "squeeze_excite.expand",
    "project_conv": "projection.project_conv",
    "project_bn": "projection.project_bn",
}
_TEXT_MODULES = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings_ln": "embeddings.LayerNorm",
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/output": "attention.output.dense",
    "attention_ln": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_ln": "output.LayerNorm",
}
_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# Present in HF checkpoints but not used by ALIGN's embeddings (the BERT pooler) or buffers.
_IGNORED_SUFFIXES = ("num_batches_tracked", "position_ids", "token_type_ids")
_IGNORED_PREFIXES = ("text_model.pooler.",)


class ConversionError(ValueError):
    """The HF directory cannot be converted; the message names the file or tensor."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def _square_size(value, path: Path) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"{path}: vision_config.image_size {value} is not square")
        value = value[0]
    return int(value)


def model_config_from_hf(hf: dict, path: Path, max_text_length: int | None = None) -> ml_collections.ConfigDict:
    """An align_jax model config equivalent to a HF `AlignConfig` dict; the text length defaults
    to 64, or to the position table's size when that is smaller."""
    if hf.get("model_type") != "align":
        raise ConversionError(f"{path}: model_type is {hf.get('model_type')!r}, not an ALIGN model ('align')")
    vision = {**HF_VISION_DEFAULTS, **hf.get("vision_config", {})}
    text = {**HF_TEXT_DEFAULTS, **hf.get("text_config", {})}
    top = {**HF_DEFAULTS, **hf}
    if vision["num_channels"] != 3:
        raise ConversionError(
            f"{path}: vision_config.num_channels is {vision['num_channels']}; only RGB (3) is supported"
        )
    if vision["hidden_act"] not in IMAGE_ACTIVATIONS:
        raise ConversionError(f"{path}: unsupported vision_config.hidden_act {vision['hidden_act']!r}")
    if vision["pooling_type"] not in ("mean", "max"):
        raise ConversionError(f"{path}: unsupported vision_config.pooling_type {vision['pooling_type']!r}")
    if text["hidden_act"] not in TEXT_ACTIVATIONS:
        raise ConversionError(f"{path}: unsupported text_config.hidden_act {text['hidden_act']!r}")
    if text["position_embedding_type"] != "absolute":
        raise ConversionError(
            f"{path}: text_config.position_embedding_type {text['position_embedding_type']!r}; "
            "only 'absolute' is supported"
        )
    if max_text_length is None:
        max_text_length = min(DEFAULT_MAX_TEXT_LENGTH, text["max_position_embeddings"])
    if max_text_length > text["max_position_embeddings"]:
        raise ConversionError(
            f"max_text_length {max_text_length} exceeds text_config.max_position_embeddings "
            f"{text['max_position_embeddings']}"
        )
    image = ml_collections.ConfigDict(
        dict(
            width_coefficient=float(vision["width_coefficient"]),
            depth_coefficient=float(vision["depth_coefficient"]),
            depth_divisor=int(vision["depth_divisor"]),
            **{k: tuple(vision[k]) for k in BASE_STAGES},
            depthwise_padding=tuple(vision["depthwise_padding"]),
            squeeze_expansion_ratio=float(vision["squeeze_expansion_ratio"]),
            activation=vision["hidden_act"],
            pooling=vision["pooling_type"],
            bn_momentum=0.99,  # Flax/TF semantics; HF's PyTorch value means something else
            bn_epsilon=float(vision["batch_norm_eps"]),
            drop_connect_rate=float(vision["drop_connect_rate"]),
            drop_connect_mode="elementwise",  # HF implements drop-connect as plain dropout
            bn_group_size=None,
        )
    )
    text_cfg = ml_collections.ConfigDict(
        dict(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=int(text["num_attention_heads"]),
            intermediate_size=int(text["intermediate_size"]),
            max_position_embeddings=int(text["max_position_embeddings"]),
            type_vocab_size=int(text["type_vocab_size"]),
            layer_norm_eps=float(text["layer_norm_eps"]),
            hidden_dropout=float(text["hidden_dropout_prob"]),
            attention_dropout=float(text["attention_probs_dropout_prob"]),
            activation=text["hidden_act"],
        )
    )
    config = model_config(
        image, text_cfg, int(top["projection_dim"]), _square_size(vision["image_size"], path), max_text_length
    )
    config.temperature_init = float(top["temperature_init_value"])
    width = build_model(config).image_tower.features
    if width != config.embed_dim:
        raise ConversionError(
            f"{path}: projection_dim {config.embed_dim} differs from the image tower width {width}; "
            "HF ALIGN has no image projection, so this model cannot compute logits"
        )
    return config


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors`, or of the shards its index names."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = [hf_dir / name for name in sorted(set(_read_json(index).get("weight_map", {}).values()))]
        if not files:
            raise ConversionError(f"{index} names no weight files")
    else:
        hint = (
            " (only safetensors are read; pickled .bin files are not)"
            if (hf_dir / "pytorch_model.bin").exists()
            else ""
        )
        raise ConversionError(f"missing file: {single}{hint}")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise ConversionError(f"missing file: {file}")
        try:
            tensors.update(load_file(str(file)))
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"cannot read {file}: {e}") from e
    return tensors


def _to_flax(key: str, leaf: str, array: np.ndarray, target_ndim: int) -> np.ndarray:
    """PyTorch layout -> Flax layout: Linear (out, in) and 1x1 conv (out, in, 1, 1) -> (in, out);
    conv OIHW -> HWIO (depthwise (C, 1, k, k) -> (k, k, 1, C))."""
    if leaf != "kernel":
        return array
    if target_ndim == 4:
        if array.ndim != 4:
            raise ConversionError(f"tensor {key}: expected a 4-d conv weight, got shape {array.shape}")
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]
    if array.ndim != 2:
        raise ConversionError(f"tensor {key}: expected a 2-d weight, got shape {array.shape}")
    return array.T


def _hf_key(path: tuple[str, ...]) -> str:
    """Our variable path (collection first) -> the HF tensor name."""
    _, *modules, leaf = path
    hf_leaf = _LEAVES[leaf]
    if modules[0] in ("temperature",):
        return "temperature"
    if modules[0] == "text_projection":
        return f"text_projection.{hf_leaf}"
    tower, *rest = modules
    if tower == "image_tower":
        if rest[0].startswith("block_"):
            block = rest[0].removeprefix("block_")
            return f"vision_model.encoder.blocks.{block}.{_IMAGE_MODULES[rest[1]]}.{hf_leaf}"
        return f"vision_model.{_IMAGE_MODULES[rest[0]]}.{hf_leaf}"
    if tower == "text_tower":
        if rest[0].startswith("layer_"):
            layer = rest[0].removeprefix("layer_")
            return f"text_model.encoder.layer.{layer}.{_TEXT_MODULES['/'.join(rest[1:])]}.{hf_leaf}"
        return f"text_model.{_TEXT_MODULES[rest[0]]}.{hf_leaf}"
    raise ConversionError(f"no HF tensor corresponds to {'/'.join(path)}")


def convert_variables(tensors: dict[str, np.ndarray], abstract: dict, source: str) -> dict:
    """Fills a tree shaped like `abstract` from HF tensors; every tensor must be used once."""
    used: set[str] = set()

    def fill(path, target) -> np.ndarray:
        names = tuple(p.key for p in path)
        if names[-1] == "temperature":
            key, leaf = "temperature", "temperature"
        else:
            key, leaf = _hf_key(names), names[-1]
        if key not in tensors:
            raise ConversionError(f"{source}: missing tensor {key} (needed for {'/'.join(names)})")
        array = _to_flax(key, leaf, np.asarray(tensors[key]), len(target.shape))
        if array.shape != target.shape:
            raise ConversionError(
                f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, which does not fit "
                f"{'/'.join(names)} of shape {target.shape} (config.json and weights disagree)"
            )
        used.add(key)
        return array.astype(target.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, abstract)
    unused = sorted(
        k
        for k in tensors
        if k not in used and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(_IGNORED_PREFIXES)
    )
    if unused:
        raise ConversionError(
            f"{source}: tensors not used by the model: {unused[:8]}{' ...' if len(unused) > 8 else ''}"
        )
    return variables


def read_hf_vocab(hf_dir: Path) -> list[str]:
    """The WordPiece vocab of a HF directory: vocab.txt, or a fast tokenizer's tokenizer.json."""
    vocab, tokenizer_json = hf_dir / "vocab.txt", hf_dir / "tokenizer.json"
    if vocab.is_file():
        try:
            return read_vocab(str(vocab))
        except ValueError as e:
            raise ConversionError(str(e)) from e
    if tokenizer_json.is_file():
        pieces = _read_json(tokenizer_json).get("model", {}).get("vocab")
        if not isinstance(pieces, dict) or sorted(pieces.values()) != list(range(len(pieces))):
            raise ConversionError(f"{tokenizer_json} holds no WordPiece vocab")
        tokens = sorted(pieces, key=pieces.get)
        try:
            check_vocab(tokens, str(tokenizer_json))
        except ValueError as e:
            raise ConversionError(str(e)) from e
        return tokens
    raise ConversionError(f"missing file: {vocab} (the WordPiece vocab of the HF tokenizer)")


def convert(hf_dir: str | Path, output: str | Path, max_text_length: int | None = None) -> ml_collections.ConfigDict:
    """Converts `hf_dir` into the align_jax workdir `output`; returns the saved config."""
    hf_dir, output = Path(hf_dir), Path(output)
    if not hf_dir.is_dir():
        raise ConversionError(f"HF directory not found: {hf_dir}")
    if (output / checkpointing.CHECKPOINT_DIR).exists() and any((output / checkpointing.CHECKPOINT_DIR).iterdir()):
        raise ConversionError(f"{output} already holds checkpoints; choose an empty output directory")
    hf_config = _read_json(hf_dir / "config.json")
    tokenizer_config = hf_dir / "tokenizer_config.json"
    tok = _read_json(tokenizer_config) if tokenizer_config.is_file() else {}
    model_cfg = model_config_from_hf(hf_config, hf_dir / "config.json", max_text_length)
    tensors = read_safetensors(hf_dir)
    model = build_model(model_cfg)
    abstract = jax.eval_shape(lambda: init_variables(model, model_cfg, jax.random.key(0)))
    variables = convert_variables(tensors, abstract, str(hf_dir))
    vocab = read_hf_vocab(hf_dir)
    if len(vocab) > model_cfg.text.vocab_size:
        raise ConversionError(
            f"{hf_dir}: the tokenizer vocab has {len(vocab)} tokens, more than text_config.vocab_size "
            f"{model_cfg.text.vocab_size}"
        )

    output.mkdir(parents=True, exist_ok=True)
    (output / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    config = ml_collections.ConfigDict(
        dict(
            model=model_cfg,
            data=dict(vocab="vocab.txt", lower_case=bool(tok.get("do_lower_case", True))),
            source=dict(hf_dir=str(hf_dir.resolve())),
        )
    )
    checkpointing.save_config(output, config)
    checkpointing.save_model(output, 0, variables)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--hf_dir", required=True, help="HF ALIGN directory (config.json, model.safetensors, vocab.txt)"
    )
    parser.add_argument("--output", required=True, help="align_jax workdir to write")
    parser.add_argument(
        "--max_text_length", type=int, default=None, help=f"token length (default {DEFAULT_MAX_TEXT_LENGTH})"
    )
    args = parser.parse_args(argv)
    try:
        config = convert(args.hf_dir, args.output, args.max_text_length)
    except ConversionError as e:
        raise SystemExit(f"convert_hf: {e}") from None
    print(f"wrote {args.output}: embed_dim {config.model.embed_dim}, image_size {config.model.image_size}")


if __name__ == "__main__":
    main()
