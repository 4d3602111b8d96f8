"""Host-side input: readers, image and text preprocessing (TensorFlow, kept off accelerators)."""

import tensorflow as tf

# TF must not take accelerator memory that JAX needs.
for _kind in ("GPU", "TPU"):
    try:
        tf.config.set_visible_devices([], _kind)
    except (RuntimeError, ValueError):  # devices already initialised, or no such device type
        pass
