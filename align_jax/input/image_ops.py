"""Image preprocessing shared by the input pipeline and inference (TF ops, so tf.data can use it)."""

from __future__ import annotations

import tensorflow as tf

# ALIGN (and HF's align-base processor) resize to 346 x 346 and centre-crop 289 for evaluation;
# other resolutions keep the same ratio.
ALIGN_RESIZE, ALIGN_CROP = 346, 289


def eval_resize_size(image_size: int) -> int:
    """The side an image is resized to before the centre crop of `image_size`."""
    return int(round(image_size * ALIGN_RESIZE / ALIGN_CROP))


def to_unit_range(images: tf.Tensor) -> tf.Tensor:
    """uint8-valued pixels -> float32 in [-1, 1] (x / 127.5 - 1; ALIGN uses no mean/std)."""
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def resize_and_center_crop(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """`[..., H, W, 3]` -> `[..., image_size, image_size, 3]` float32 pixels in [0, 255].

    As ALIGN/HF evaluate: a square resize (bicubic, antialiased) to `eval_resize_size`, then the
    central `image_size` crop.
    """
    resize = eval_resize_size(image_size)
    images = tf.image.resize(tf.cast(images, tf.float32), (resize, resize), method="bicubic", antialias=True)
    images = tf.clip_by_value(images, 0.0, 255.0)
    offset = (resize - image_size) // 2
    return images[..., offset : offset + image_size, offset : offset + image_size, :]
