"""align_jax: ALIGN-style dual-encoder image-text pretraining in JAX/Flax."""

import os

# TensorFlow serves only the host input pipeline; its C++ start-up chatter (CUDA probing, oneDNN
# notes) says nothing about align_jax. Set before any submodule imports TF; users may override.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
