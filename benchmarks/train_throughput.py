"""Train-step throughput (images/s) of align_jax against HF transformers `AlignModel` (PyTorch, CPU).

    python -m benchmarks.train_throughput [--configs tiny,small,bert_heavy] [--batch 32] [--rounds 5]

One training step on a synthetic batch in both: forward of both towers in training mode (BatchNorm
batch statistics, dropout, element-wise drop-connect), the contrastive loss with label smoothing 0.1
averaged over the two directions (HF's `align_loss`; ours with `reduction="mean"`), the backward
pass and an AdamW update (weight decay 1e-5 on weights of rank >= 2 only, constant learning rate),
float32. align_jax: `align_jax.train_step.make_train_step` on a one-device mesh, compiled ahead of
the timing (compile time reported separately). PyTorch: `AlignModel(..., return_loss=True)`,
`loss.backward()`, fused AdamW. See benchmarks/torch_reference.py for how the two are matched.
Prints one JSON object last (per config: align_jax_img_s, torch_img_s, ratio) and rewrites its
section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import torch_reference as ref

SECTION = "Train-step throughput vs HF PyTorch (train_throughput.py)"
TARGETS = {"small": 1.2, "bert_heavy": 1.5}  # issue 8: align_jax / HF img/s
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-5


def jax_worker(name: str, args: argparse.Namespace) -> dict:
    import time

    import jax

    from align_jax import optim, train_step
    from align_jax.models import build_model
    from align_jax.sharding import batch_sharding

    config = ref.matched_config(name)
    model = build_model(config)
    opt_config = optim.default_config()
    opt_config.update(
        name="adamw", learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, warmup_steps=0, decay="constant"
    )
    tx, schedule = optim.make_optimizer(opt_config, 1_000_000)
    loss_config = train_step.default_loss_config()
    loss_config.reduction = "mean"  # HF averages the two directions
    mesh = ref.one_device_mesh()
    state, shardings = train_step.create_train_state(model, config, tx, mesh, jax.random.key(ref.SEED))
    step = train_step.make_train_step(model, loss_config, tx, schedule, mesh, shardings)
    batch = jax.device_put(ref.synthetic_batch(config, args.batch), batch_sharding(mesh))

    start = time.perf_counter()
    compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = dict(state=state)

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        holder["loss"] = float(metrics["loss"])  # blocks

    times = ref.time_steps(run_step, args.warmup, args.steps)
    return ref.worker_result(
        "jax", name, args.batch, times, compile_s=round(compile_s, 2), loss=holder["loss"], torch_mode="-"
    )


def torch_worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    ref.configure_torch(args.threads)
    config = ref.matched_config(name)
    model = ref.build_hf_model(config).train()
    inputs = ref.torch_inputs(ref.synthetic_batch(config, args.batch))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        dict(params=[p for _, p in named if p.ndim >= 2], weight_decay=WEIGHT_DECAY),
        dict(params=[p for _, p in named if p.ndim < 2], weight_decay=0.0),
    ]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-6, fused=True)

    def loss_fn(inputs):
        return model(**inputs, return_loss=True).loss

    loss_fn, mode = ref.maybe_compile(loss_fn, args.torch_mode)
    holder = {}

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inputs)
        loss.backward()
        optimizer.step()
        holder["loss"] = loss.item()

    times = ref.time_steps(run_step, args.warmup, args.steps)
    return ref.worker_result("torch", name, args.batch, times, loss=holder["loss"], torch_mode=mode)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ref.add_arguments(parser, steps=5)
    args = parser.parse_args(argv)
    if args.worker:
        ref.pin_threads(args.threads)
        worker = jax_worker if args.worker == "jax" else torch_worker
        out = worker(args.configs, args)
        ref.common.print_json(out)
        return out

    summary = ref.compare("benchmarks.train_throughput", args, TARGETS, jax_extra=("compile_s",))
    summary["benchmark"] = "train_throughput"
    command = "python -m benchmarks.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    compile_line = ", ".join(
        f"{name} {r['align_jax_compile_s']:.0f} s" for name, r in summary["results"].items()
    )
    ref.write_results(
        SECTION,
        ref.environment_line(summary, command.strip())
        + "\n\nOne step = forward of both towers in training mode, contrastive loss (label smoothing 0.1, "
        "mean of the two directions), backward, AdamW update. align_jax: the compiled "
        "`make_train_step` on one device; PyTorch: HF `AlignModel(return_loss=True)`, `backward()`, fused "
        f"AdamW, {summary['results'][next(iter(summary['results']))]['torch_mode']}. "
        f"align_jax compile time (excluded from the rates, median per worker): {compile_line}.\n\n"
        + ref.results_table(summary, "img/s"),
        args.no_results,
    )
    ref.common.print_json(summary)
    return summary


if __name__ == "__main__":
    main()
