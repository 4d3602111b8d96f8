"""EfficientNet-B0 at 224 px + a 4-layer, 256-wide BERT (text length 32): the CPU benchmark model,
and a first run on one accelerator."""

from align_jax.config import base_config
from align_jax.models import presets


def get_config():
    config = base_config()
    config.model = presets.small()
    config.batch_size = 256
    config.total_steps = 20_000
    config.optimizer.warmup_steps = 1_000
    config.log_every = 50
    config.checkpoint_every = 1_000
    config.eval_every = 2_000
    return config
