"""Our tensorflow_text tokenizer gives HF BertTokenizer's ids, in eager code and in tf.data."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from transformers import BertTokenizer

from align_jax.input.text_ops import MAX_CHARS_PER_WORD, Tokenizer, read_vocab
from tests import fixtures

VARIED = [
    "A photo of the CAT!",
    'hello-world\'s "quoted" (paren) [br] {c} ... ?!',
    "Café au lait, naïve résumé ÀÉÎ",
    "中文日本語 mixed 中文",
    "emoji 😀 here 🐱 🇺🇸",
    "123,456.78 running 2024-01-01",
    "",
    "   ",
    "Straße STRASSE ß",
    "ΣΊΣΥΦΟΣ σ ς Σ",
    "İstanbul ıi",
    "ﬁsh ﬁne ﬀ ǅ",
    "tab\there\nnewline\r\x00null\u200bzero-width \x07bell \x0bvt \x85nel x\ufffdy",
    "word\u00a0nbsp\u3000ideographic space",
    "Ｆｕｌｌｗｉｄｔｈ ⅷ ⑤ ²",
    "unaffordable photographs played",
    "a" * MAX_CHARS_PER_WORD,
    "a" * (MAX_CHARS_PER_WORD + 1),
    "ä" * (MAX_CHARS_PER_WORD + 1),
    "the cat " * 40,  # over-long: truncated
]


@pytest.fixture(scope="module")
def tokenizers(vocab_path):
    return Tokenizer(vocab_path, max_length=24), BertTokenizer(vocab_path, do_lower_case=True)


@pytest.mark.parametrize("text", VARIED)
def test_ids_and_mask_equal_hf_bert_tokenizer(tokenizers, text):
    ours, hf = tokenizers
    ids, mask = ours([text])
    ref = hf(text, max_length=24, truncation=True, padding="max_length")
    assert ids[0].tolist() == ref["input_ids"]
    assert mask[0].tolist() == ref["attention_mask"]


def test_layout_is_cls_pieces_sep_then_padding(tokenizers):
    ours, _ = tokenizers
    ids, mask = ours(["the cat", "the cat " * 40, ""])
    assert ids.shape == mask.shape == (3, 24) and ids.dtype == mask.dtype == np.int32
    assert ids[0, :4].tolist() == [ours.cls_id, ours.vocab.index("the"), ours.vocab.index("cat"), ours.sep_id]
    assert mask[0].tolist() == [1] * 4 + [0] * 20 and (ids[0, 4:] == ours.pad_id).all()
    assert mask[1].all() and ids[1, -1] == ours.sep_id  # truncated to 22 pieces
    assert ids[2, :2].tolist() == [ours.cls_id, ours.sep_id] and mask[2].sum() == 2


def test_tokenize_runs_inside_tf_data(tokenizers):
    ours, _ = tokenizers
    texts = ["a photo of a cat", "Café ﬁne", "中文"]
    ds = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(ours.tokenize)
    ids = np.concatenate([i.numpy() for i, _ in ds])
    np.testing.assert_array_equal(ids, ours(texts)[0])


def test_empty_list_gives_empty_arrays(tokenizers):
    ids, mask = tokenizers[0]([])
    assert ids.shape == mask.shape == (0, 24)


def test_single_string_is_rejected(tokenizers):
    with pytest.raises(TypeError, match="list of strings"):
        tokenizers[0]("a photo")


def test_missing_vocab_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer(str(tmp_path / "nope.txt"), 16)


def test_duplicate_vocab_token_is_named(tmp_path):
    path = fixtures.write_vocab(tmp_path / "v.txt", fixtures.TEST_VOCAB + ["cat"])
    with pytest.raises(ValueError, match="'cat' appears twice"):
        read_vocab(path)


def test_vocab_without_special_tokens_is_rejected(tmp_path):
    path = fixtures.write_vocab(tmp_path / "v.txt", ["[PAD]", "[UNK]", "cat"])
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        read_vocab(path)


def test_max_length_below_two_is_rejected(vocab_path):
    with pytest.raises(ValueError, match="max_length"):
        Tokenizer(vocab_path, 1)
