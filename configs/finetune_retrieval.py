"""Retrieval fine-tuning (ALIGN's fine-tuned Flickr30K / MSCOCO results): the whole
dual encoder of a pretrained checkpoint trained on with the contrastive loss on a captions
dataset with several captions per image, one drawn per image each time it is used, at a lower
learning rate; evaluated by held-out image<->text retrieval over every caption.

    python -m align_jax.train --config configs/finetune_retrieval.py:workdirs/demo \\
        --workdir workdirs/demo_retrieval

The argument is the checkpoint (an align_jax workdir, a checkpoints/<step> folder or a
tools/convert_hf output); its model, data settings and vocab are the starting point. From a demo
checkpoint it trains on the demo data's captioned split (3 to 5 differently phrased captions per
scene, COCO-style) and evaluates on the split's test half. A COCO or Flickr30K set written with
its captions as fields caption_0 .. caption_4 (make_tfrecords --extra_columns) runs the same:

    --config.data.train='tfrecord:/data/coco-train-*.tfrecord' --config.data.eval='tfrecord:/data/coco-test-*.tfrecord'
"""

from align_jax.config import finetune_config, retrieval_eval
from align_jax.input import demo_data


def get_config(checkpoint: str = "workdirs/demo"):
    config = finetune_config(checkpoint)
    # Each use of an image draws one of its valid captions, uniformly (absent fields are skipped).
    config.data.captions = {field: 1.0 for field in demo_data.CAPTION_FIELDS}
    if config.get("demo_data"):
        config.demo_data.train_split = "captioned_train"
        config.demo_data.eval_split = "captioned_test"
    config.batch_size = 64
    config.total_steps = 400
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 5e-4  # a quarter of the demo's pretraining rate
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_steps = 50
    config.optimizer.decay = "cosine"
    config.log_every = 50
    config.checkpoint_every = 200
    config.eval_every = 0  # at the end
    config.evals.retrieval = retrieval_eval(caption_fields=demo_data.CAPTION_FIELDS)
    return config
