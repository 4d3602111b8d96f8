"""The paper's largest model: EfficientNet-L2 + BERT-Large, 1376-d embeddings, trained with the
same recipe as ALIGN-base (global batch 16384, LAMB, 1.2M steps) on 1024 TPUv3 cores. FSDP
shards its ~800M parameters and optimizer state over the `fsdp` axis."""

from align_jax.config import base_config
from align_jax.models import presets


def get_config():
    config = base_config()
    config.model = presets.align_l2()
    config.mesh = (("data", -1), ("fsdp", 8))
    return config
