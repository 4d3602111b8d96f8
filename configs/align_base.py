"""ALIGN-base (Jia et al. 2021, section 5): EfficientNet-B7 + BERT-base, 289 px, 640-d embeddings,
global batch 16384, LAMB lr 1e-3, 10k warmup steps, linear decay to 0 at 1.2M steps, weight
decay 1e-5, label smoothing 0.1, temperature init 1.0, text length 64. Every value is the
common base's; name your data:

    python -m align_jax.train --config configs/align_base.py --workdir gs://bucket/align_base \
        --config.data.train='tfrecord:gs://bucket/shards/train-*.tfrecord' \
        --config.data.vocab=gs://bucket/bert-base-uncased-vocab.txt
"""

from align_jax.config import base_config


def get_config():
    return base_config()
