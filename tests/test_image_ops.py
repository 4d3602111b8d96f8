from __future__ import annotations

import numpy as np

from align_jax.input import image_ops


def test_eval_resize_follows_align_346_over_289():
    assert image_ops.eval_resize_size(289) == 346
    assert image_ops.eval_resize_size(64) == 77


def test_resize_and_center_crop_keeps_the_centre():
    # A white square in the middle of a black 200 x 300 image stays central after the square
    # resize and crop; its corners stay black.
    image = np.zeros((200, 300, 3), np.uint8)
    image[80:120, 130:170] = 255
    out = image_ops.resize_and_center_crop(image[None], 64).numpy()[0]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[32, 32].min() > 250 and out[:4, :4].max() < 5
