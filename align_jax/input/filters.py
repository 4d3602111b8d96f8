"""ALIGN's noise filters (paper section 3) that look at one example at a time.

Each returns a skip reason code (0 = keep) so the pipeline can count what it removed. The filters
that need corpus-wide counts (alt-texts shared by many images, images with many alt-texts, rare
tokens) run offline (`align_jax.tools.filter_shards`), producing block lists applied here.
"""

from __future__ import annotations

import ml_collections
import tensorflow as tf

# Order matters: the first failing check names the reason. 0 means kept.
SKIP_REASONS = (
    "undecodable_image",
    "image_too_large",
    "image_too_small",
    "bad_aspect_ratio",
    "blocked_image",
    "empty_caption",
    "invalid_utf8",
    "too_few_words",
    "too_many_words",
    "blocked_text",
)
REASON_CODE = {name: i + 1 for i, name in enumerate(SKIP_REASONS)}


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            min_image_side=200,  # pixels, shorter side
            max_aspect_ratio=3.0,
            max_pixels=50_000_000,  # never decode larger images (decompression bombs)
            min_words=3,  # unigrams of the alt-text
            max_words=20,
            word_filter_fields=("txt",),  # caption fields the unigram-count filters apply to
            block_list="",  # directory written by align_jax.tools.filter_shards ('' = none)
        )
    )


def image_reason(height_width: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """Reason code for an image of header size `[h, w]` (`[-1, -1]`: not an image we read)."""
    h, w = tf.cast(height_width[0], tf.float32), tf.cast(height_width[1], tf.float32)
    short, long = tf.minimum(h, w), tf.maximum(h, w)
    code = tf.constant(0, tf.int32)
    checks = [
        ("undecodable_image", short <= 0),
        ("image_too_large", h * w > config.max_pixels),
        ("image_too_small", short < config.min_image_side),
        ("bad_aspect_ratio", long > config.max_aspect_ratio * short),
    ]
    for name, failed in reversed(checks):  # the first failing check wins
        code = tf.where(failed, REASON_CODE[name], code)
    return code


def caption_reason(text: tf.Tensor, word_filters: bool, config: ml_collections.ConfigDict) -> tf.Tensor:
    """Reason code per caption (any shape of string tensor): empty or whitespace, invalid UTF-8,
    and (for alt-text fields) fewer than `min_words` or more than `max_words` unigrams."""
    shape = tf.shape(text)
    text = tf.reshape(text, [-1])
    # Valid UTF-8 survives a transcode that drops invalid sequences unchanged.
    valid_utf8 = tf.equal(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="ignore"), text)
    stripped = tf.strings.strip(text)
    words = tf.cast(tf.strings.split(stripped).row_lengths(), tf.int32)
    checks = [("empty_caption", tf.equal(tf.strings.length(stripped), 0)), ("invalid_utf8", tf.logical_not(valid_utf8))]
    if word_filters:
        checks += [("too_few_words", words < config.min_words), ("too_many_words", words > config.max_words)]
    code = tf.zeros_like(words)
    for name, failed in reversed(checks):
        code = tf.where(failed, REASON_CODE[name], code)
    return tf.reshape(code, shape)
