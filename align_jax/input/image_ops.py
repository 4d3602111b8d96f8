"""Image preprocessing shared by the input pipeline and inference (TF ops, so tf.data can use it)."""

from __future__ import annotations

import tensorflow as tf

# ALIGN (and HF's align-base processor) resize to 346 x 346 and centre-crop 289 for evaluation;
# other resolutions keep the same ratio.
ALIGN_RESIZE, ALIGN_CROP = 346, 289


def eval_resize_size(image_size: int) -> int:
    """The side an image is resized to before the centre crop of `image_size`."""
    return int(round(image_size * ALIGN_RESIZE / ALIGN_CROP))


def _to_uint8(images: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 255.0)), tf.uint8)


def resize_and_center_crop(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """`[..., H, W, 3]` -> uint8 `[..., image_size, image_size, 3]`.

    As ALIGN/HF evaluate: a square resize (bicubic, antialiased) to `eval_resize_size`, then the
    central `image_size` crop. Pixels stay uint8 on the host (a quarter of float32's bytes to
    move); the model scales them to [-1, 1] on the device.
    """
    resize = eval_resize_size(image_size)
    images = tf.image.resize(tf.cast(images, tf.float32), (resize, resize), method="bicubic", antialias=True)
    offset = (resize - image_size) // 2
    return _to_uint8(images[..., offset : offset + image_size, offset : offset + image_size, :])


def _uint_be(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    """Unsigned big-endian integer from `length` bytes of `data` at `start`."""
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8), tf.int64)
    return tf.reduce_sum(values * (256 ** tf.range(length - 1, -1, -1, dtype=tf.int64)))


def _uint_le(data: tf.Tensor, start: int, length: int) -> tf.Tensor:
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, length), tf.uint8), tf.int64)
    return tf.reduce_sum(values * (256 ** tf.range(length, dtype=tf.int64)))


def image_size_from_header(data: tf.Tensor) -> tf.Tensor:
    """`[height, width]` (int64) read from a JPEG, PNG, GIF or BMP header without decoding the
    pixels, so size filters cost nothing and huge images are never decoded; `[-1, -1]` when the
    bytes are none of these (or too short to tell). A JPEG whose header is corrupt raises, like a
    failed decode (the pipeline counts both as undecodable)."""
    size = tf.strings.length(data)
    unknown = tf.constant([-1, -1], tf.int64)

    def jpeg():
        return tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64)

    def png():  # IHDR: width, height as 4-byte big-endian at 16 and 20
        return tf.cond(size >= 24, lambda: tf.stack([_uint_be(data, 20, 4), _uint_be(data, 16, 4)]), lambda: unknown)

    def gif():  # logical screen: width, height as 2-byte little-endian at 6 and 8
        return tf.cond(size >= 10, lambda: tf.stack([_uint_le(data, 8, 2), _uint_le(data, 6, 2)]), lambda: unknown)

    def bmp():  # BITMAPINFOHEADER: width, height as signed 4-byte little-endian at 18 and 22
        def read():
            height = _uint_le(data, 22, 4)
            height = tf.where(height >= 2**31, 2**32 - height, height)  # negative: top-down rows
            return tf.stack([height, _uint_le(data, 18, 4)])

        return tf.cond(size >= 26, read, lambda: unknown)

    magic = tf.strings.substr(data, 0, 4)
    return tf.case(
        [
            (tf.strings.substr(magic, 0, 3) == b"\xff\xd8\xff", jpeg),
            (magic == b"\x89PNG", png),
            (tf.strings.substr(magic, 0, 3) == b"GIF", gif),
            (tf.strings.substr(magic, 0, 2) == b"BM", bmp),
        ],
        default=lambda: unknown,
        exclusive=False,
    )


def decode_rgb(data: tf.Tensor) -> tf.Tensor:
    """JPEG, PNG, GIF (first frame) or BMP bytes -> uint8 `[H, W, 3]`; grayscale is repeated to
    three channels and an alpha channel is composited onto white."""
    image = tf.io.decode_image(data, expand_animations=False)
    channels = tf.shape(image)[-1]

    def from_gray():
        return tf.image.grayscale_to_rgb(image[..., :1])

    def from_rgba():
        rgb, alpha = tf.cast(image[..., :3], tf.float32), tf.cast(image[..., 3:], tf.float32) / 255.0
        return tf.cast(tf.round(rgb * alpha + 255.0 * (1.0 - alpha)), tf.uint8)

    def from_gray_alpha():
        gray, alpha = tf.cast(image[..., :1], tf.float32), tf.cast(image[..., 1:2], tf.float32) / 255.0
        return tf.image.grayscale_to_rgb(tf.cast(tf.round(gray * alpha + 255.0 * (1.0 - alpha)), tf.uint8))

    image = tf.switch_case(
        tf.clip_by_value(channels - 1, 0, 3),
        [from_gray, from_gray_alpha, lambda: image[..., :3], from_rgba],
    )
    image.set_shape([None, None, 3])
    return image


def _crop_window(height: tf.Tensor, width: tf.Tensor, fraction: float, seed: tf.Tensor) -> tf.Tensor:
    """`[y, x, h, w]` of a crop covering `fraction` of each side at a uniform random offset."""
    crop_h = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float32) * fraction), tf.int32))
    crop_w = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float32) * fraction), tf.int32))
    seeds = tf.random.experimental.stateless_split(seed, 2)
    y = tf.random.stateless_uniform([], seeds[0], 0, height - crop_h + 1, tf.int32)
    x = tf.random.stateless_uniform([], seeds[1], 0, width - crop_w + 1, tf.int32)
    return tf.stack([y, x, crop_h, crop_w])


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear; antialiased only when shrinking more than 2x (the costly case is rare after
    a DCT-domain downscale, and below 2x bilinear already reads every source pixel)."""
    shrink = tf.cast(tf.reduce_max(tf.shape(image)[:2]), tf.float32) / image_size
    return tf.cond(
        shrink > 2.0,
        lambda: tf.image.resize(image, (image_size, image_size), antialias=True),
        lambda: tf.image.resize(image, (image_size, image_size)),
    )


def decode_random_crop(
    data: tf.Tensor,
    image_size: int,
    resize_size: int,
    seed: tf.Tensor,
    height_width: tf.Tensor | None = None,
    flip: bool = True,
) -> tf.Tensor:
    """ALIGN/coyo training augmentation from encoded bytes -> uint8 `[image_size, image_size, 3]`.

    ALIGN resizes to `resize_size` (346) square, takes a random `image_size` (289) crop and flips
    at random. The same crops, cheaper: pick the crop window in source coordinates (the same
    fraction, 289/346, of each side), decode only that (JPEG: `decode_and_crop_jpeg`, or a 2x/4x/8x
    DCT-domain downscale when the image is large enough), and resize only the crop. Stateless:
    `seed` ([2] int) fixes the draw. `height_width`: the size from `image_size_from_header`, if
    the caller has it already. `flip=False` keeps the orientation (captions that say left/right).
    """
    fraction = image_size / resize_size
    window_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data) if height_width is None else tf.cast(height_width, tf.int32)
        short = tf.minimum(shape[0], shape[1])
        # The largest DCT downscale that keeps the short side at or above resize_size.
        branch = tf.reduce_sum(tf.cast(short >= resize_size * tf.constant([2, 4, 8]), tf.int32))

        def full_resolution():
            window = _crop_window(shape[0], shape[1], fraction, window_seed)
            return tf.image.decode_and_crop_jpeg(data, window, channels=3)

        def downscaled(ratio):
            def decode():
                image = tf.io.decode_jpeg(data, channels=3, ratio=ratio)
                window = _crop_window(tf.shape(image)[0], tf.shape(image)[1], fraction, window_seed)
                return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

            return decode

        return tf.switch_case(branch, [full_resolution, downscaled(2), downscaled(4), downscaled(8)])

    def other():
        image = decode_rgb(data)
        window = _crop_window(tf.shape(image)[0], tf.shape(image)[1], fraction, window_seed)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    is_jpeg = tf.strings.substr(data, 0, 3) == b"\xff\xd8\xff"
    crop = tf.cond(is_jpeg, jpeg, other)
    crop.set_shape([None, None, 3])
    # Resize straight from uint8 (no float copy of the crop); flip the small uint8 result.
    image = _to_uint8(_resize(crop, image_size))
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed) if flip else image
