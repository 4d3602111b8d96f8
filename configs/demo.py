"""The demo: the tiny model trained on the embedded demo data (rendered shapes with a noisy
alt-text and a rich rewritten caption each, mixed VeCap-style), generated into the workdir on
first use; held-out image<->text retrieval, zero-shot classification of the first shape,
image+text query retrieval and a linear probe of the image embeddings are evaluated at the end.

    make demo      # python -m align_jax.train --config configs/demo.py --workdir workdirs/demo
"""

import ml_collections

from align_jax.config import base_config, image_text_eval, linear_probe_eval, retrieval_eval, zeroshot_eval
from align_jax.input import demo_data
from align_jax.models import presets


def get_config():
    config = base_config()
    config.model = presets.tiny()
    config.model.max_text_length = 24  # the rich captions run to ~20 tokens
    # ALIGN's temperature init of 1.0 needs hundreds of steps to come down; the demo has 1200.
    config.model.temperature_init = 0.1
    config.demo_data = ml_collections.ConfigDict(
        dict(
            num_train=4096,
            num_eval=512,
            num_shards=8,
            image_size=96,
            seed=0,
            num_queries=256,
            num_labelled=demo_data.NUM_LABELLED,  # (train, test) single-shape scenes for transfer
            num_captioned=demo_data.NUM_CAPTIONED,  # (train, test) scenes with 3-5 captions each
        )
    )
    # Demo images are 96 px: ALIGN's 200 px minimum would drop them all.
    config.data.filters.min_image_side = 32
    config.data.captions = {"txt": 0.5, "vecap": 0.5}
    config.data.random_flip = False  # the captions say left and right
    config.data.shuffle_buffer = 2_048
    config.batch_size = 64
    config.total_steps = 1_200
    # LAMB's layer-wise trust ratio suits ALIGN's 16k batches; for a tiny model at batch 64 AdamW
    # learns in far fewer steps (in-batch top-1 at step 300: 8% against LAMB's 3%).
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_steps = 100
    config.log_every = 50
    config.checkpoint_every = 400
    config.eval_every = 0  # at the end
    config.evals.retrieval = retrieval_eval(caption_fields=("vecap",))
    # The label is the first shape and its colour: 24 classes, chance 4%.
    config.evals.zeroshot = zeroshot_eval(
        class_names=demo_data.class_names(), templates=("a {}.", "a small {}.", "a large {}.")
    )
    # Scene + "on a black background" -> the same scene on black, among 512 gallery images that
    # include every unchanged scene (queries and gallery: the demo data's composed-query split).
    config.evals.image_text = image_text_eval()
    # Transfer with a frozen tower: ridge classifiers on the image embeddings of the demo's
    # labelled split (one shape per scene), full and few-shot, for its two class fields: the
    # shape and colour (24 classes) and the size and position (8 classes).
    config.evals.linear_probe = linear_probe_eval()
    config.evals.linear_probe_layout = linear_probe_eval(label_field="layout")
    return config
