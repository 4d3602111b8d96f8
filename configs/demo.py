"""The demo: the tiny model trained on the embedded demo data (rendered shapes with a noisy
alt-text and a rich rewritten caption each, mixed VeCap-style), generated into the workdir on
first use; held-out image<->text retrieval is evaluated at the end.

    make demo      # python -m align_jax.train --config configs/demo.py --workdir workdirs/demo
"""

import ml_collections

from align_jax.config import base_config, retrieval_eval
from align_jax.models import presets


def get_config():
    config = base_config()
    config.model = presets.tiny()
    config.demo_data = ml_collections.ConfigDict(
        dict(num_train=4096, num_eval=512, num_shards=8, image_size=96, seed=0)
    )
    # Demo images are 96 px: ALIGN's 200 px minimum would drop them all.
    config.data.filters.min_image_side = 32
    config.data.captions = {"txt": 0.5, "vecap": 0.5}
    config.data.shuffle_buffer = 2_048
    config.batch_size = 64
    config.total_steps = 1_200
    config.optimizer.learning_rate = 2e-3
    config.optimizer.warmup_steps = 100
    config.log_every = 50
    config.checkpoint_every = 400
    config.eval_every = 0  # at the end
    config.evals.retrieval = retrieval_eval(caption_fields=("vecap",))
    return config
