"""Transfer from the demo checkpoint (issue 10): the linear probe of its image embeddings against
the same probe on a randomly initialised tower, classification fine-tuning against the probe, and
held-out retrieval before and after retrieval fine-tuning.

    make demo                                   # trains workdirs/demo once
    python -m benchmarks.transfer [--checkpoint workdirs/demo] [--workdir_root workdirs/transfer]

The probes and the "before" figures are computed here; the fine-tuning runs are
`configs/finetune_classification.py` (once per class field of the demo's labelled split:
`label`, shape and colour, 24 classes; `layout`, size and position, 8 classes) and
`configs/finetune_retrieval.py`, trained with `align_jax.train` into the workdir root. A finished
run is only re-evaluated, so a rerun is cheap; delete its folder to retrain. Prints one JSON line
and writes the "Transfer" section of RESULTS.md (unless --no_results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL_FIELDS = ("label", "layout")  # the demo's labelled split: shape x colour, size x position
WIDE_MARGIN = 0.2  # the probe on the pretrained tower must beat the random one by this much (top-1)


def finetune(config_file: str, checkpoint: str, workdir: str, *overrides: str) -> tuple[dict, float]:
    """(final metrics, wall seconds) of `align_jax.train` with a fine-tuning config."""
    command = [
        sys.executable,
        "-m",
        "align_jax.train",
        "--config",
        f"{os.path.join(REPO, 'configs', config_file)}:{checkpoint}",
        "--workdir",
        workdir,
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{config_file} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def evaluate_pretrained_and_random(checkpoint: str, classification_workdir: str, retrieval_workdir: str) -> dict:
    """The linear probes (pretrained and random tower, each class field) and the retrieval figures
    of the pretrained checkpoint on the fine-tuning runs' held-out splits."""
    import jax
    import ml_collections

    from align_jax import checkpointing
    from align_jax import config as config_lib
    from align_jax.evaluators import build_evaluators
    from align_jax.models import build_model, init_variables
    from align_jax.sharding import make_mesh

    workdir = os.path.abspath(checkpoint)
    pretrained_config = checkpointing.load_config(workdir)
    model = build_model(pretrained_config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, pretrained_config.model, jax.random.key(0)))
    variables = {
        "pretrained": checkpointing.restore_model(workdir, checkpointing.abstract_on_device(shapes)),
        "random": init_variables(model, pretrained_config.model, jax.random.key(0)),
    }
    mesh = make_mesh([("data", -1), ("fsdp", 1)])
    # The fine-tuning runs' saved configs name the demo splits they wrote (and the vocab).
    labelled = checkpointing.load_config(classification_workdir)
    captioned = checkpointing.load_config(retrieval_workdir)
    config = ml_collections.ConfigDict(dict(model=pretrained_config.model, data=labelled.data, batch_size=64))
    config.data.vocab = os.path.join(classification_workdir, labelled.data.vocab)
    config.evals = ml_collections.ConfigDict(
        {
            f"probe_{field}": config_lib.linear_probe_eval(
                train_data=labelled.data.train, data=labelled.data.eval, label_field=field
            )
            for field in LABEL_FIELDS
        }
    )
    probes = build_evaluators(config, model, mesh)
    out = {name: {} for name in variables}
    for name, v in variables.items():
        for evaluator in probes.values():
            out[name].update(evaluator.run(v))
    retrieval_config = ml_collections.ConfigDict(
        dict(model=pretrained_config.model, data=captioned.data, batch_size=64)
    )
    retrieval_config.data.vocab = os.path.join(retrieval_workdir, captioned.data.vocab)
    retrieval_config.evals = captioned.evals
    [retrieval] = build_evaluators(retrieval_config, model, mesh).values()
    out["pretrained"].update(retrieval.run(variables["pretrained"]))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=os.path.join(REPO, "workdirs", "demo"), help="a `make demo` workdir")
    parser.add_argument("--workdir_root", default=os.path.join(REPO, "workdirs", "transfer"))
    parser.add_argument("--no_results", action="store_true")
    args = parser.parse_args(argv)
    checkpoint = os.path.abspath(args.checkpoint)
    if not os.path.exists(os.path.join(checkpoint, "config.json")):
        raise SystemExit(f"no demo checkpoint in {checkpoint}: run `make demo` first")

    runs = {}
    from align_jax.input import demo_data

    num_classes = dict(label=len(demo_data.class_names()), layout=len(demo_data.layout_names()))
    for field in LABEL_FIELDS:
        workdir = os.path.join(args.workdir_root, f"classification_{field}")
        metrics, seconds = finetune(
            "finetune_classification.py",
            checkpoint,
            workdir,
            f"--config.data.label_field={field}",
            f"--config.model.num_classes={num_classes[field]}",
        )
        runs[f"classification_{field}"] = dict(top1=metrics["classification/top1"], wall_s=round(seconds, 1))
        print(f"classification_{field}: {json.dumps(runs[f'classification_{field}'])}", file=sys.stderr)
    retrieval_workdir = os.path.join(args.workdir_root, "retrieval")
    after, seconds = finetune("finetune_retrieval.py", checkpoint, retrieval_workdir)
    before = evaluate_pretrained_and_random(
        checkpoint, os.path.join(args.workdir_root, "classification_label"), retrieval_workdir
    )
    recall_keys = [f"retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    probe = {
        field: {
            tower: {
                key: before[tower][f"probe_{field}/{key}"]
                for key in ("top1", "1shot_top1", "5shot_top1", "10shot_top1")
            }
            for tower in ("pretrained", "random")
        }
        for field in LABEL_FIELDS
    }
    out = dict(
        benchmark="transfer",
        machine=common.machine(),
        checkpoint=checkpoint,
        settings=dict(
            classification=_settings(os.path.join(args.workdir_root, "classification_label")),
            retrieval=_settings(retrieval_workdir),
        ),
        probe=probe,
        classification={field: runs[f"classification_{field}"] for field in LABEL_FIELDS},
        retrieval=dict(
            before={k: before["pretrained"][k] for k in recall_keys},
            after={k: after[k] for k in recall_keys},
            wall_s=round(seconds, 1),
        ),
    )
    out["checks"] = dict(
        probe_beats_random_widely={
            f: probe[f]["pretrained"]["top1"] - probe[f]["random"]["top1"] >= WIDE_MARGIN for f in LABEL_FIELDS
        },
        finetuning_beats_probe={
            f: out["classification"][f]["top1"] > probe[f]["pretrained"]["top1"] for f in LABEL_FIELDS
        },
        retrieval_finetuning_raises_recall=all(
            out["retrieval"]["after"][f"retrieval/{d}_r1"] > out["retrieval"]["before"][f"retrieval/{d}_r1"]
            for d in ("i2t", "t2i")
        ),
    )
    if not args.no_results:
        write_results(out, " ".join(argv if argv is not None else sys.argv[1:]))
    common.print_json(out)
    return out


def _settings(workdir: str) -> dict:
    """What a fine-tuning run was: from its saved config."""
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    return dict(
        image_size=config["model"]["image_size"],
        steps=config["total_steps"],
        batch_size=config["batch_size"],
        learning_rate=config["optimizer"]["learning_rate"],
        decay=config["optimizer"]["decay"],
    )


def write_results(out: dict, command_args: str) -> None:
    rows = ["| labels | probe, random tower | probe, pretrained | 10-shot, random | 10-shot, pretrained | fine-tuned |"]
    rows.append("| --- | --- | --- | --- | --- | --- |")
    names = dict(label="shape x colour (24)", layout="size x position (8)")
    for field in LABEL_FIELDS:
        p, r = out["probe"][field]["pretrained"], out["probe"][field]["random"]
        rows.append(
            f"| {names[field]} | {r['top1']:.3f} | {p['top1']:.3f} | {r['10shot_top1']:.3f} | {p['10shot_top1']:.3f} "
            f"| {out['classification'][field]['top1']:.3f} |"
        )
    recall = ["| | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 |", "|---" * 7 + "|"]
    for when in ("before", "after"):
        values = out["retrieval"][when]
        recall.append(
            f"| {when} | "
            + " | ".join(f"{values[f'retrieval/{d}_r{k}']:.3f}" for d in ("i2t", "t2i") for k in (1, 5, 10))
            + " |"
        )
    command = " ".join(["python -m benchmarks.transfer", command_args]).strip()
    cls, ret = out["settings"]["classification"], out["settings"]["retrieval"]
    common.write_section(
        "Transfer (transfer.py)",
        f"`{command}` on {out['machine']}, from the `make demo` checkpoint (64 px). "
        "Top-1 on the demo's labelled test split (512 single-shape scenes): the linear probe (ridge on the frozen "
        "image embeddings, fitted on the 2048 training scenes; 10-shot: 10 per class) of the pretrained tower and "
        "of a randomly initialised one, and the tower fine-tuned with a new head "
        f"(`configs/finetune_classification.py`: {cls['image_size']} px, {cls['steps']} steps of batch "
        f"{cls['batch_size']}, AdamW at {cls['learning_rate']:g} with {cls['decay']} decay, label smoothing 0.1). "
        "Retrieval on the captioned test split (512 scenes, 3-5 captions each) before and after "
        f"`configs/finetune_retrieval.py` ({ret['steps']} steps of batch {ret['batch_size']} at "
        f"{ret['learning_rate']:g}).\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(recall)
        + f"\n\nChecks: {json.dumps(out['checks'])}",
    )


if __name__ == "__main__":
    main()
