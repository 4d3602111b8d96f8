"""Classification fine-tuning (ALIGN's transfer to classification): the image tower of a
pretrained checkpoint with a new, zero-initialised linear head, trained with label-smoothed
softmax cross-entropy at a lower learning rate than pretraining, here at a higher resolution than
it was pretrained at (the EfficientNet tower is fully convolutional with a mean pool; a ViT's
position embeddings are resampled).

    python -m align_jax.train --config configs/finetune_classification.py:workdirs/demo \\
        --workdir workdirs/demo_classification

The argument is the checkpoint: an align_jax workdir, one of its checkpoints/<step> folders or a
tools/convert_hf output; its model, data settings and vocab are the starting point. From a demo
checkpoint it trains on the demo data's labelled split (one shape per scene; its shape and colour,
24 classes) and reports top-1 on the split's test half. Elsewhere name the data, e.g.

    --config.data.train=tfds:food101:train --config.data.eval=tfds:food101:validation \\
    --config.data.label_field=label --config.model.num_classes=101
"""

from align_jax.config import classification_eval, finetune_config
from align_jax.input import demo_data


def get_config(checkpoint: str = "workdirs/demo"):
    config = finetune_config(checkpoint)
    config.task = "classification"
    config.model.num_classes = len(demo_data.class_names())
    config.model.image_size = 96  # the demo pretrains at 64 px; its images are 96 px
    config.data.label_field = "label"
    config.loss.label_smoothing = 0.1
    if config.get("demo_data"):
        config.demo_data.train_split = "labelled_train"
        config.demo_data.eval_split = "labelled_test"
    config.batch_size = 64
    config.total_steps = 600
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3  # half the demo's pretraining rate
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_steps = 50
    config.optimizer.decay = "cosine"
    config.log_every = 50
    config.checkpoint_every = 300
    config.eval_every = 0  # at the end
    config.evals.classification = classification_eval()
    return config
