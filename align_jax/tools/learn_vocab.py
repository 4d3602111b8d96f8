"""Learns a WordPiece vocab from captions with tensorflow_text's BERT vocab tool.

    python -m align_jax.tools.learn_vocab --data tfrecord:shards/*.tfrecord --field txt \\
        --output vocab.txt --vocab_size 30522
    python -m align_jax.tools.learn_vocab --text_file captions.txt --output vocab.txt

Texts are normalised exactly as the tokenizer will see them (HF BertNormalizer rules), and the
special tokens [PAD] [UNK] [CLS] [SEP] [MASK] come first.
"""

from __future__ import annotations

import argparse

import tensorflow as tf
from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset as bert_vocab

from align_jax.input import readers
from align_jax.input.text_ops import SPECIAL_TOKENS, check_vocab, normalize

RESERVED = [*SPECIAL_TOKENS, "[MASK]"]


def texts_dataset(data: str = "", field: str = readers.TEXT_FIELD, text_file: str = "") -> tf.data.Dataset:
    if bool(data) == bool(text_file):
        raise ValueError("give exactly one of --data (a tfrecord: spec) or --text_file")
    if text_file:
        if not tf.io.gfile.exists(text_file):
            raise FileNotFoundError(f"text file not found: {text_file}")
        return tf.data.TextLineDataset(text_file)
    datasets = []
    for source in readers.parse_spec(data):
        if source.kind != "tfrecord":
            raise ValueError(f"learn_vocab reads tfrecord: sources, got {source.kind!r}")
        files = readers.tfrecord_files(source.path)
        datasets.append(tf.data.TFRecordDataset(files).map(lambda s: readers.parse_example(s, [field])[field]))
    ds = datasets[0]
    for other in datasets[1:]:
        ds = ds.concatenate(other)
    return ds


def learn_vocab(texts: tf.data.Dataset, vocab_size: int, lower_case: bool = True) -> list[str]:
    normalized = texts.batch(1024).map(lambda t: normalize(t, lower_case)).unbatch()
    tokens = bert_vocab.bert_vocab_from_dataset(
        normalized.batch(1024).prefetch(2),
        vocab_size=vocab_size,
        reserved_tokens=RESERVED,
        bert_tokenizer_params=dict(lower_case=False),
    )
    check_vocab(tokens, "learned vocab")
    return tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="tfrecord:GLOB source(s)")
    parser.add_argument("--field", default=readers.TEXT_FIELD)
    parser.add_argument("--text_file", default="", help="one text per line")
    parser.add_argument("--output", required=True)
    parser.add_argument("--vocab_size", type=int, default=30522)
    parser.add_argument("--cased", action="store_true", help="keep case and accents (default: uncased)")
    args = parser.parse_args(argv)
    try:
        tokens = learn_vocab(texts_dataset(args.data, args.field, args.text_file), args.vocab_size, not args.cased)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"learn_vocab: {e}") from None
    with tf.io.gfile.GFile(args.output, "w") as f:
        f.write("".join(t + "\n" for t in tokens))
    print(f"wrote {len(tokens)} tokens to {args.output}")


if __name__ == "__main__":
    main()
