"""Issue 10's transfer recipes end to end on a small demo run, through the training program and
the shipped configs (tests/transfer_recipes.py): the linear probe of a pretrained tower beats the
same probe of a randomly initialised one by a wide margin, classification fine-tuning beats the
probe, and retrieval fine-tuning raises held-out recall.

The runs go in one subprocess on one CPU device: the claims are about what the recipes learn (the
8-device tests of the steps and evaluators check the sharding), and one device runs these tiny
models twice as fast as eight emulated ones.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import pytest

from align_jax.input import demo_data
from tests import background

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDE_MARGIN = 0.2


def _recipes_run(tmp_path_factory) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS="",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
        ALIGN_JAX_COMPILE_CACHE=jax.config.jax_compilation_cache_dir or "",
    )
    proc = background.run(
        [sys.executable, "-m", "tests.transfer_recipes", str(tmp_path_factory.mktemp("recipes"))],
        env=env,
        cwd=REPO,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The subprocess starts with the session, in the background lane (tests/background.py).
BACKGROUND_JOBS = {"figures": _recipes_run}


@pytest.fixture(scope="module")
def figures(background_jobs) -> dict:
    return background_jobs.result("figures")


def test_probe_of_the_pretrained_tower_beats_a_random_tower_widely(figures):
    pretrained, random = figures["probe_pretrained"], figures["probe_random"]
    assert pretrained["probe/num_classes"] == random["probe/num_classes"] == len(demo_data.layout_names())
    assert pretrained["probe/num_test"] == 128 and pretrained["step"] == 300
    assert pretrained["probe/top1"] - random["probe/top1"] >= WIDE_MARGIN, (pretrained, random)


def test_classification_finetuning_beats_the_probe(figures):
    result = figures["classification"]
    assert result["step"] == 300 and result["classification/num_images"] == 128
    assert result["classification/top1"] > figures["probe_pretrained"]["probe/top1"], result


def test_retrieval_finetuning_raises_held_out_recall(figures):
    before, after = figures["retrieval_before"], figures["retrieval_after"]
    # Every caption of the 128 held-out scenes counts: 3 to 5 each.
    assert before["retrieval/num_images"] == after["retrieval/num_images"] == 128
    assert before["retrieval/num_texts"] == after["retrieval/num_texts"] >= 128 * 3

    def mean_recall(metrics):
        return sum(metrics[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6

    assert mean_recall(after) > mean_recall(before) + 0.05, (before, after)
