"""examples/inference.ipynb runs top to bottom on a freshly trained demo-style workdir.

The workdir is laid out as `make demo` leaves it (demo data in `<workdir>/demo_data`), the
notebook is executed by a `python3` kernel of this interpreter, and its JSON summary line and
picture outputs are checked.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import nbclient
import nbformat
import pytest

from align_jax.input import demo_data
from tests import fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "inference.ipynb")
NUM_EVAL = fixtures.TRAINED_DEMO_NUM_EVAL  # fewer than the notebook asks for: it takes what there is


@pytest.fixture(scope="module")
def workdir(trained_demo_workdir):
    """6 training steps of the tiny model on demo data written where `make demo` writes it (on 8
    devices, parameters sharded over fsdp: tests/demo_workdir.py, test_inference.py's checkpoint)."""
    return trained_demo_workdir


def _kernel_spec_dir(tmp_path) -> str:
    """A `python3` kernel spec running this interpreter, whatever others the machine has."""
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps(dict(argv=argv, display_name="Python 3", language="python")))
    return str(tmp_path)


@pytest.fixture(scope="module")
def executed(workdir, tmp_path_factory):
    jupyter_path = _kernel_spec_dir(tmp_path_factory.mktemp("jupyter"))
    env = dict(
        os.environ,
        ALIGN_JAX_WORKDIR=str(workdir),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="",  # one device, as in a user's notebook
        JUPYTER_PATH=jupyter_path,
        PYTHONPATH=REPO,
        TF_CPP_MIN_LOG_LEVEL="2",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
    )
    with pytest.MonkeyPatch.context() as patch:  # the kernel spec manager reads it from this process
        patch.setenv("JUPYTER_PATH", jupyter_path)
        nb = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": REPO}})
        client.execute(env=env)
    return nb


def _outputs(nb):
    return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def _summary(nb) -> dict:
    last = nb.cells[-1]
    lines = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream").strip().splitlines()
    return json.loads(lines[-1])


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_without_errors_in_this_interpreter(executed):
    assert not [o for o in _outputs(executed) if o.output_type == "error"]
    assert all(cell.execution_count for cell in executed.cells if cell.cell_type == "code")


def test_notebook_draws_picture_grids(executed):
    pngs = [o for o in _outputs(executed) if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) >= 4  # captions, zero-shot, text search, image and image + text search


def _check_hits(hits, k, num_images):
    assert len(hits) == k
    assert all(isinstance(i, int) and 0 <= i < num_images for i, _ in hits)
    assert len({i for i, _ in hits}) == k
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)


def test_summary_reports_embeddings_zero_shot_and_search_results(executed, workdir):
    summary = _summary(executed)
    assert summary["workdir"] == str(workdir)
    assert summary["num_images"] == NUM_EVAL and summary["embed_dim"] == 64
    for key in ("caption_top1", "zero_shot_top1", "zero_shot_top3"):
        assert isinstance(summary[key], float) and 0.0 <= summary[key] <= 1.0
    assert summary["zero_shot_top1"] <= summary["zero_shot_top3"]
    names = set(demo_data.class_names())
    assert len(summary["zero_shot_top_labels"]) == 3
    assert all(len(row) == 3 and set(row) <= names for row in summary["zero_shot_top_labels"])
    for key in ("text_search", "image_search", "image_text_search"):
        _check_hits(summary[key], 6, NUM_EVAL)
    # The query image is in the index (as #0): the best match is itself or a tie with it.
    assert summary["image_search"][0][1] == pytest.approx(1.0, abs=1e-4)
