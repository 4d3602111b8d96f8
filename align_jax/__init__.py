"""align_jax: ALIGN-style dual-encoder image-text pretraining in JAX/Flax."""

__version__ = "0.1.0"
