"""A few-hundred-thousand-parameter model at 64 px for tests and quick CPU experiments."""

from align_jax.config import base_config
from align_jax.models import presets


def get_config():
    config = base_config()
    config.model = presets.tiny()
    config.batch_size = 64
    config.total_steps = 1_000
    config.optimizer.warmup_steps = 100
    config.data.shuffle_buffer = 1_000
    config.log_every = 20
    config.checkpoint_every = 200
    config.eval_every = 500
    return config
