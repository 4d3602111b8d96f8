"""HF weight parity: tiny HF AlignModels converted with the tool match HF's outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from align_jax import inference
from align_jax.tools import convert_hf
from tests import fixtures
from tests.hf_reference import HF_CONFIGS, build_hf_model, hf_embeddings

TEXTS = ["a photo of a cat", "the big red dog is running", "", "中文 with ﬁne cafe résumé!", "x " * 50]


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def converted(request, tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp(f"hf_{request.param}")
    hf_model = build_hf_model(request.param, hf_dir, seed=len(request.param))
    out = tmp_path_factory.mktemp(f"jax_{request.param}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "align_jax.tools.convert_hf",
            "--hf_dir",
            str(hf_dir),
            "--output",
            str(out),
            "--max_text_length",
            "24",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return hf_model, hf_dir, out


def test_converted_model_matches_hf_embeddings_and_logits(converted):
    hf_model, _, out = converted
    model = inference.load(out)
    size = model.image_size
    images = fixtures.random_images(5, size, seed=1)
    ids, mask = model.tokenizer(TEXTS)
    ref_image, ref_text, ref_logits = hf_embeddings(hf_model, images, ids, mask)
    for ref in (ref_image, ref_text, ref_logits):
        assert np.isfinite(ref).all()
    # Non-trivial: embeddings of different inputs are far from each other.
    assert np.abs(ref_image[0] - ref_image[1]).max() > 1e-2
    assert np.abs(ref_text[0] - ref_text[1]).max() > 1e-2

    image = model.encode_images(images)
    text = model.encode_texts(TEXTS)
    assert image.dtype == np.float32 and image.shape == ref_image.shape
    np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, atol=1e-5)
    assert np.abs(image - ref_image).max() < 1e-4
    assert np.abs(text - ref_text).max() < 1e-4
    assert np.abs(model.logits(image, text) - ref_logits).max() < 1e-4
    assert model.temperature == pytest.approx(hf_model.temperature.item())


def test_batching_does_not_change_embeddings(converted):
    model = inference.load(converted[2])
    images = fixtures.random_images(7, model.image_size, seed=2)
    whole = model.encode_images(images, batch_size=8)
    pieces = model.encode_images(images, batch_size=3)
    np.testing.assert_allclose(whole, pieces, atol=1e-5)


def _copy_hf_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_file_is_named(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted[1], tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(convert_hf.ConversionError, match="model.safetensors"):
        convert_hf.convert(hf_dir, tmp_path / "out")


def test_missing_vocab_is_named(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted[1], tmp_path / "hf")
    for name in ("vocab.txt", "tokenizer.json"):
        if (hf_dir / name).exists():
            (hf_dir / name).unlink()
    with pytest.raises(convert_hf.ConversionError, match="vocab.txt"):
        convert_hf.convert(hf_dir, tmp_path / "out")


def test_non_align_config_is_rejected(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted[1], tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "clip"
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert_hf.ConversionError, match=r"config.json.*'clip'"):
        convert_hf.convert(hf_dir, tmp_path / "out")


def test_shape_mismatch_names_the_tensor(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted[1], tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    key = "text_model.encoder.layer.1.intermediate.dense.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(convert_hf.ConversionError, match=key.replace(".", r"\.")):
        convert_hf.convert(hf_dir, tmp_path / "out")


def test_unexpected_tensor_is_named(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted[1], tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["vision_model.extra_head.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(convert_hf.ConversionError, match="vision_model.extra_head.weight"):
        convert_hf.convert(hf_dir, tmp_path / "out")


def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "align_jax.tools.convert_hf",
            "--hf_dir",
            str(tmp_path / "nope"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "HF directory not found" in result.stderr and "Traceback" not in result.stderr


def test_vocab_is_rebuilt_from_tokenizer_json_when_vocab_txt_is_absent(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted[1], tmp_path / "hf")
    assert (hf_dir / "tokenizer.json").is_file()
    (hf_dir / "vocab.txt").unlink()
    convert_hf.convert(hf_dir, tmp_path / "out")
    assert (tmp_path / "out" / "vocab.txt").read_text(encoding="utf-8").splitlines() == fixtures.TEST_VOCAB


def test_existing_checkpoints_are_not_overwritten(converted):
    with pytest.raises(convert_hf.ConversionError, match="already holds checkpoints"):
        convert_hf.convert(converted[1], converted[2])
