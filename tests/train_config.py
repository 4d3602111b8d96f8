"""A seconds-long training config on demo data (for the training program's tests).

--config tests/train_config.py:DEMO_DIR   (DEMO_DIR written by align_jax.input.demo_data)
"""

import os

from align_jax.config import base_config, retrieval_eval, zeroshot_eval
from align_jax.input import demo_data
from align_jax.models import presets


def get_config(demo_dir: str = ""):
    config = base_config()
    config.model = presets.tiny()
    config.data.train = f"tfrecord:{os.path.join(demo_dir, 'train-*.tfrecord')}"
    config.data.eval = f"tfrecord:{os.path.join(demo_dir, 'eval-*.tfrecord')}"
    config.data.vocab = os.path.join(demo_dir, "vocab.txt")
    config.data.filters.min_image_side = 16
    config.data.captions = {"txt": 0.5, "vecap": 0.5}
    config.data.shuffle_buffer = 64
    # Two input readers whatever the process count: a 2-process run reads the same batches as one.
    config.data.num_readers = 2
    config.batch_size = 16
    config.total_steps = 6
    config.optimizer.warmup_steps = 2
    config.log_every = 1
    config.checkpoint_every = 3
    config.eval_every = 0
    config.evals.retrieval = retrieval_eval(caption_fields=("vecap",), batch_size=16)
    config.evals.zeroshot = zeroshot_eval(class_names=demo_data.class_names(), templates=("a {}.",), batch_size=16)
    return config
