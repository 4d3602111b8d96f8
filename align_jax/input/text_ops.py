"""WordPiece tokenization with tensorflow_text, matching HF's BertTokenizer id for id.

tensorflow_text's own `lower_case=True` path applies NFKC case folding, which differs from
BERT's reference normaliser (and HF's) on ligatures, full-width forms, German sharp s and
control characters. We therefore normalise exactly as HF's `BertNormalizer` does, in TF ops so
the same code runs inside tf.data, and hand the result to tensorflow_text with lower-casing off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text
from tensorflow_text.python.ops.bert_tokenizer import BasicTokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")

# HF/BERT treat every character of Unicode category C* as control, except \t, \n and \r (which
# are whitespace); U+0000 and U+FFFD are dropped too. RE2 cannot subtract classes, so Cc is
# spelled out without \t \n \r. (Unassigned code points, Cn, have no RE2 class and are kept.)
_CONTROL_CHARS = r"[\x{0}-\x{8}\x{B}\x{C}\x{E}-\x{1F}\x{7F}-\x{9F}\p{Cf}\p{Co}\p{Cs}\x{FFFD}]"
# Rust's char::is_whitespace (the White_Space property) less the Cc members removed above.
_WHITESPACE_CHARS = r"[\t\n\r \x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}]"
# HF lower-cases character by character, so a word-final capital sigma becomes σ, not ς.
_CAPITAL_SIGMA = "\u03a3"
# HF's WordPiece gives [UNK] for a word longer than 100 characters; tensorflow_text counts bytes.
MAX_CHARS_PER_WORD = 100
# A word no vocabulary can spell (U+0000 is removed by normalisation), so WordPiece maps it to
# [UNK] as a whole; stands in for over-long words.
_UNSPELLABLE_WORD = "\x00"


def check_vocab(tokens: Sequence[str], source: str) -> None:
    """A usable BERT vocab: no duplicate tokens, and the special tokens present."""
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise ValueError(f"{source}: token {token!r} appears twice (lines {seen[token] + 1} and {i + 1})")
        seen[token] = i
    missing = [t for t in SPECIAL_TOKENS if t not in seen]
    if missing:
        raise ValueError(f"{source}: vocab lacks the special tokens {missing}")


def read_vocab(path: str) -> list[str]:
    """Reads a BERT vocab file (one token a line) and checks it is usable."""
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"WordPiece vocab file not found: {path}")
    with tf.io.gfile.GFile(path, "r") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    while tokens and not tokens[-1]:
        tokens.pop()
    check_vocab(tokens, path)
    return tokens


def normalize(texts: tf.Tensor, lower_case: bool = True) -> tf.Tensor:
    """HF BertNormalizer: clean, (strip accents, lower-case). CJK splitting is left to tf_text."""
    texts = tf.strings.regex_replace(texts, _CONTROL_CHARS, "")
    texts = tf.strings.regex_replace(texts, _WHITESPACE_CHARS, " ")
    if lower_case:
        texts = tf_text.normalize_utf8(texts, "NFD")
        texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
        texts = tf.strings.regex_replace(texts, _CAPITAL_SIGMA, "\u03c3")
        texts = tf.strings.lower(texts, encoding="utf-8")
    return texts


class Tokenizer:
    """BERT tokenizer: [CLS] pieces [SEP], truncated and padded to `max_length`, with a mask.

    `tokenize` works on tf tensors (use it inside tf.data); calling the object on a list of
    Python strings returns NumPy `(input_ids, attention_mask)`, both int32 `[N, max_length]`.
    """

    def __init__(self, vocab_path: str, max_length: int, lower_case: bool = True):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 for [CLS] and [SEP], got {max_length}")
        self.vocab_path = os.fspath(vocab_path)
        self.vocab = read_vocab(self.vocab_path)
        self.max_length = max_length
        self.lower_case = lower_case
        ids = {t: i for i, t in enumerate(self.vocab)}
        self.pad_id, self.unk_id = ids["[PAD]"], ids["[UNK]"]
        self.cls_id, self.sep_id = ids["[CLS]"], ids["[SEP]"]
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(self.vocab), tf.range(len(self.vocab), dtype=tf.int64)),
            num_oov_buckets=1,
        )
        self._basic = BasicTokenizer(lower_case=False)
        self._wordpiece = tf_text.WordpieceTokenizer(
            table,
            max_bytes_per_word=4 * MAX_CHARS_PER_WORD,
            token_out_type=tf.int64,
            unknown_token="[UNK]",
        )

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, texts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Strings `[N]` -> (ids, mask), int32 `[N, max_length]`."""
        texts = normalize(tf.convert_to_tensor(texts, tf.string), self.lower_case)
        words = self._basic.tokenize(texts)
        too_long = tf.strings.length(words, unit="UTF8_CHAR") > MAX_CHARS_PER_WORD
        words = tf.ragged.map_flat_values(lambda w, long: tf.where(long, _UNSPELLABLE_WORD, w), words, too_long)
        pieces = self._wordpiece.tokenize(words).merge_dims(-2, -1)
        pieces = pieces[:, : self.max_length - 2]
        n = tf.shape(texts, out_type=tf.int64)[0]
        cls = tf.fill([n, 1], tf.constant(self.cls_id, tf.int64))
        sep = tf.fill([n, 1], tf.constant(self.sep_id, tf.int64))
        ids = tf.concat([cls, pieces, sep], axis=1)
        ids, mask = tf_text.pad_model_inputs(ids, self.max_length, pad_value=self.pad_id)
        return tf.cast(ids, tf.int32), tf.cast(mask, tf.int32)

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, got a single string")
        texts = list(texts)
        if not texts:
            empty = np.zeros((0, self.max_length), np.int32)
            return empty, empty.copy()
        ids, mask = self.tokenize(tf.constant(texts, tf.string))
        return ids.numpy(), mask.numpy()
