"""The trained demo workdir of test_inference.py and test_notebook.py (conftest.py's
`trained_demo_workdir`), trained in a process of its own beside the in-process tests.

    python -m tests.demo_workdir WORKDIR     # on 8 devices (XLA_FLAGS)

6 steps of the tiny model on 8 devices, parameters sharded over an fsdp axis of 2, no evaluators,
on demo data written where `make demo` writes it (`WORKDIR/demo_data`).
"""

from __future__ import annotations

import sys

import ml_collections

from align_jax import train
from align_jax.input import demo_data
from tests import fixtures, train_config


def main(workdir: str) -> None:
    data_dir = f"{workdir}/{train.DEMO_DATA_DIR}"
    demo_data.write(data_dir, num_train=96, num_eval=fixtures.TRAINED_DEMO_NUM_EVAL, num_shards=4, image_size=64)
    config = train_config.get_config(data_dir)
    config.mesh = (("data", 4), ("fsdp", 2))
    # At momentum 0.99, 6 steps leave BatchNorm's running statistics near their init, far from the
    # activations' ones, and every image embeds to nearly the same vector (the checks would be
    # void); momentum 0 keeps the last batch's statistics.
    config.model.image.bn_momentum = 0.0
    config.evals = ml_collections.ConfigDict()
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    train.enable_compilation_cache()
    main(sys.argv[1])
