"""Train-step throughput (images/s) of align_jax against HF transformers `AlignModel` (PyTorch, CPU).

    python -m benchmarks.train_throughput [--configs tiny,small,bert_heavy] [--batch 32] [--rounds 5]
    python -m benchmarks.train_throughput --profile --configs small       # where the time goes

One training step on a synthetic batch in both: forward of both towers in training mode (BatchNorm
batch statistics, dropout, element-wise drop-connect), the contrastive loss with label smoothing 0.1
averaged over the two directions (HF's `align_loss`; ours with `reduction="mean"`), the backward
pass and an AdamW update (weight decay 1e-5 on weights of rank >= 2 only, constant learning rate),
float32. align_jax: `align_jax.train_step.make_train_step` on a one-device mesh, compiled ahead of
the timing (compile time reported separately). PyTorch: `AlignModel(..., return_loss=True)`,
`loss.backward()`, fused AdamW. See benchmarks/torch_reference.py for how the two are matched.
Prints one JSON object last (per config: align_jax_img_s, torch_img_s, ratio) and rewrites its
section of RESULTS.md.

`--profile` times each tower's forward and forward + backward alone in both frameworks, and
traces align_jax's compiled step with `jax.profiler`, attributing every executed XLA operation to
the model part its HLO metadata names (tower, forward or backward, layer); it writes its own
section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from benchmarks import torch_reference as ref

MODULE = "benchmarks.train_throughput"
SECTION = "Train-step throughput vs HF PyTorch (train_throughput.py)"
PROFILE_SECTION = "Train-step profile: align_jax vs HF PyTorch by tower (train_throughput.py --profile)"
TARGETS = {"small": 1.2, "bert_heavy": 1.5}  # issue 8: align_jax / HF img/s
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-5
PARTS = ("image_fwd", "image_fwd_bwd", "text_fwd", "text_fwd_bwd", "step")


# ----------------------------------------------------------------------------- align_jax


def jax_setup(name: str, batch_size: int):
    """(config, model, initial state, jitted train step, device batch) on one device."""
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
    batch = jax.device_put(ref.synthetic_batch(config, batch_size), batch_sharding(mesh))
    return config, model, state, step, batch


def compile_jax_step(step, state, batch):
    """(`run_step()` that advances and blocks, compile seconds, compiled executable, holder)."""
    import time

    start = time.perf_counter()
    compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = dict(state=state)

    def run_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        holder["loss"] = float(metrics["loss"])  # blocks

    return run_step, compile_s, compiled, holder


def jax_worker(name: str, args: argparse.Namespace) -> dict:
    _, _, state, step, batch = jax_setup(name, args.batch)
    run_step, compile_s, _, holder = compile_jax_step(step, state, batch)
    cpu_times = []
    times = ref.time_steps(run_step, args.warmup, args.steps, cpu_times)
    return ref.worker_result(
        "jax", name, args.batch, times, cpu_times, compile_s=round(compile_s, 2), loss=holder["loss"], torch_mode="-"
    )


def jax_tower_parts(model, state, batch) -> dict:
    """Jitted `() -> None` closures: each tower's training-mode forward, and its forward + backward
    (gradients of <embeddings, fixed cotangent> with respect to that tower's parameters only)."""
    import jax
    import jax.numpy as jnp

    from align_jax.models import DualEncoder

    params, batch_stats, rng = state.params, state.batch_stats, jax.random.key(1)
    cotangent = jax.random.normal(jax.random.key(2), (batch["images"].shape[0], model.embed_dim))

    def image_fwd(own, images):
        variables = {"params": {**params, **own}, "batch_stats": batch_stats}
        embeds, _ = model.apply(
            variables,
            images,
            train=True,
            method=DualEncoder.encode_image,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        return embeds

    def text_fwd(own, ids, mask):
        variables = {"params": {**params, **own}}
        return model.apply(variables, ids, mask, train=True, method=DualEncoder.encode_text, rngs={"dropout": rng})

    def grad_of(fwd):
        return jax.grad(lambda own, *inputs: jnp.vdot(fwd(own, *inputs), cotangent))

    image_params = {k: v for k, v in params.items() if k.startswith("image")}
    text_params = {k: v for k, v in params.items() if k.startswith("text")}
    text_inputs = (batch["input_ids"], batch["attention_mask"])
    calls = dict(
        image_fwd=(image_fwd, image_params, (batch["images"],)),
        image_fwd_bwd=(grad_of(image_fwd), image_params, (batch["images"],)),
        text_fwd=(text_fwd, text_params, text_inputs),
        text_fwd_bwd=(grad_of(text_fwd), text_params, text_inputs),
    )
    parts = {}
    for part, (fn, own, inputs) in calls.items():
        compiled = jax.jit(fn).lower(own, *inputs).compile()
        parts[part] = lambda compiled=compiled, own=own, inputs=inputs: jax.block_until_ready(compiled(own, *inputs))
    return parts


_IMAGE_LAYERS = re.compile(
    r"(stem_conv|stem_bn|expand_conv|expand_bn|depthwise_conv|depthwise_bn|se_reduce|se_expand|project_conv"
    r"|project_bn|DropConnect|silu|sigmoid|l2_normalize|image_projection)"
)
_TEXT_LAYERS = re.compile(
    r"(attention/(?:query|key|value|output)|attention_ln|output_ln|intermediate|/output/|embeddings_ln"
    r"|word_embeddings|position_embeddings|Dropout|gelu|text_projection|attention)"
)


def classify_op(op_name: str) -> tuple[str, str, str]:
    """HLO `op_name` metadata -> (tower, pass, layer): the pass is 'bwd' under `transpose(jvp(`,
    'fwd' under `jvp(`, else 'update' (loss, optimizer, metrics)."""
    pass_ = "bwd" if "transpose(jvp(" in op_name else "fwd" if "jvp(" in op_name else "update"
    if "image_tower" in op_name or "encode_image" in op_name:
        match = _IMAGE_LAYERS.search(op_name)
        return "image", pass_, match.group(1) if match else "other"
    if "text_tower" in op_name or "encode_text" in op_name:
        match = _TEXT_LAYERS.search(op_name)
        return "text", pass_, match.group(1).strip("/") if match else "other"
    return "loss+optimizer", pass_, "loss" if pass_ != "update" else "optimizer, metrics"


def trace_breakdown(compiled, run_step, steps: int) -> dict:
    """CPU time of every XLA operation of `steps` traced steps, summed per (tower, pass, layer)
    and per HLO instruction family (the instruction name without its number)."""
    import jax

    op_names = dict(
        re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"', compiled.as_text(), re.M)
    )
    with tempfile.TemporaryDirectory(prefix="align_trace_") as directory:
        with jax.profiler.trace(directory):
            for _ in range(steps):
                run_step()
        (path,) = Path(directory).rglob("*.xplane.pb")
        data = jax.profiler.ProfileData.from_file(str(path))
        events = [
            (event.name, event.duration_ns)
            for plane in data.planes
            for line in plane.lines
            if line.name.startswith("tf_XLAEigen")  # XLA:CPU's intra-op threads run the operations
            for event in line.events
            if event.name in op_names
        ]
    by_layer, by_pass, by_family = collections.Counter(), collections.Counter(), collections.Counter()
    for name, ns in events:
        tower, pass_, layer = classify_op(op_names[name])
        by_layer[(tower, pass_, layer)] += ns
        by_pass[(tower, pass_)] += ns
        by_family[re.sub(r"[.\d]+$", "", name)] += ns
    total = sum(by_pass.values()) or 1

    def rows(counter, keys, top):
        return [
            dict(zip(keys, k, strict=True), cpu_ms_per_step=round(ns / steps / 1e6, 1), share=round(ns / total, 3))
            for k, ns in counter.most_common(top)
        ]

    return dict(
        cpu_ms_per_step=round(total / steps / 1e6, 1),
        by_pass=rows(by_pass, ("tower", "pass"), None),
        by_layer=rows(by_layer, ("tower", "pass", "layer"), 12),
        by_family=rows(collections.Counter({(k,): v for k, v in by_family.items()}), ("family",), 10),
    )


def jax_parts_worker(name: str, args: argparse.Namespace) -> dict:
    _, model, state, step, batch = jax_setup(name, args.batch)
    parts = jax_tower_parts(model, state, batch)
    run_step, _, compiled, _ = compile_jax_step(step, state, batch)
    parts["step"] = run_step
    times = {part: statistics.median(ref.time_steps(parts[part], args.warmup, args.steps)) for part in PARTS}
    return dict(framework="jax", config=name, part_s=times, trace=trace_breakdown(compiled, run_step, args.steps))


# ----------------------------------------------------------------------------- PyTorch


def torch_train_step(name: str, args: argparse.Namespace):
    """(model, inputs, `run_step()`, mode): one HF training step with fused AdamW."""
    import torch

    config = ref.matched_config(name)
    model = ref.build_hf_model(config).train()
    inputs = ref.torch_inputs(ref.synthetic_batch(config, args.batch))
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in trained if p.ndim >= 2], weight_decay=WEIGHT_DECAY),
        dict(params=[p for p in trained if p.ndim < 2], weight_decay=0.0),
    ]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-6, fused=True)
    loss_fn, mode = ref.maybe_compile(lambda inputs: model(**inputs, return_loss=True).loss, args.torch_mode)

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(inputs)
        loss.backward()
        optimizer.step()
        run_step.loss = loss.item()

    return model, inputs, run_step, mode


def torch_worker(name: str, args: argparse.Namespace) -> dict:
    _, _, run_step, mode = torch_train_step(name, args)
    cpu_times = []
    times = ref.time_steps(run_step, args.warmup, args.steps, cpu_times)
    return ref.worker_result("torch", name, args.batch, times, cpu_times, loss=run_step.loss, torch_mode=mode)


def torch_parts_worker(name: str, args: argparse.Namespace) -> dict:
    import torch

    model, inputs, run_step, _ = torch_train_step(name, args)
    cotangent = torch.randn(args.batch, model.config.projection_dim)

    def normalized(x):
        return x / x.norm(dim=-1, keepdim=True)

    def image():
        return normalized(model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)

    def text():
        features = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return normalized(features.pooler_output)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    def forward_backward(fn):
        def run():
            model.zero_grad(set_to_none=True)
            (fn() * cotangent).sum().backward()

        return run

    parts = dict(
        image_fwd=forward(image),
        image_fwd_bwd=forward_backward(image),
        text_fwd=forward(text),
        text_fwd_bwd=forward_backward(text),
        step=run_step,
    )
    times = {part: statistics.median(ref.time_steps(parts[part], args.warmup, args.steps)) for part in PARTS}
    return dict(framework="torch", config=name, part_s=times)


# ----------------------------------------------------------------------------- profile report


def profile(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Tower-by-tower times in both frameworks (fresh workers) and align_jax's step trace."""
    results = {}
    for name in args.configs.split(","):
        jax_out = ref.run_worker(MODULE, "jax_parts", name, args)
        torch_out = ref.run_worker(MODULE, "torch_parts", name, args)
        results[name] = dict(align_jax_s=jax_out["part_s"], torch_s=torch_out["part_s"], trace=jax_out["trace"])
        print(name, results[name]["align_jax_s"], results[name]["torch_s"], file=sys.stderr, flush=True)
    out = dict(benchmark="train_profile", batch=args.batch, busy=ref.busy_pytest(), results=results)
    if not args.no_results:
        command = " ".join(["python -m", MODULE, *(argv if argv is not None else sys.argv[1:])])
        common.write_section(PROFILE_SECTION, profile_markdown(out, command))
    common.print_json(out)
    return out


def profile_markdown(out: dict, command: str) -> str:
    labels = dict(
        image_fwd="image tower forward (train mode, no gradient)",
        image_fwd_bwd="image tower forward + backward",
        text_fwd="text tower forward (train mode, no gradient)",
        text_fwd_bwd="text tower forward + backward",
        step="whole train step",
    )
    text = [
        f"`{command}`, batch {out['batch']}, float32, one fresh process per framework, medians of timed "
        "calls after warm-up. Forward + backward = gradients of <embeddings, fixed cotangent> with respect "
        "to that tower's parameters."
        + (" A pytest suite was running at the same time: absolute times are inflated." if out["busy"] else "")
    ]
    for name, r in out["results"].items():
        rows = ["| part | align_jax ms | PyTorch ms | align_jax / PyTorch time |", "| --- | --- | --- | --- |"]
        for part in PARTS:
            j, t = r["align_jax_s"][part], r["torch_s"][part]
            rows.append(f"| {labels[part]} | {j * 1e3:.0f} | {t * 1e3:.0f} | {j / t:.2f} |")
        trace = r["trace"]
        passes = ", ".join(
            f"{p['tower']} {p['pass']} {p['share']:.0%}" for p in trace["by_pass"] if p["share"] >= 0.005
        )
        layers = ["| tower | pass | layer | CPU ms / step | share |", "| --- | --- | --- | --- | --- |"]
        layers += [
            f"| {x['tower']} | {x['pass']} | {x['layer']} | {x['cpu_ms_per_step']:.0f} | {x['share']:.1%} |"
            for x in trace["by_layer"]
        ]
        families = ", ".join(f"`{x['family']}` {x['share']:.0%}" for x in trace["by_family"])
        text += [
            f"### {name}\n\n" + "\n".join(rows),
            f"align_jax step trace (`jax.profiler`, XLA operations attributed by their HLO `op_name`): "
            f"{trace['cpu_ms_per_step']:.0f} CPU-ms per step over all threads; by tower and pass: {passes}. "
            f"Largest layers:\n\n" + "\n".join(layers),
            f"By XLA instruction family: {families}.",
        ]
    return "\n\n".join(text)


# ----------------------------------------------------------------------------- command line

WORKERS = dict(jax=jax_worker, torch=torch_worker, jax_parts=jax_parts_worker, torch_parts=torch_parts_worker)


def main(argv: list[str] | None = None) -> dict:
    parser = ref.make_parser(__doc__, steps=5)
    parser.add_argument("--profile", action="store_true", help="tower-by-tower times and align_jax's step trace")
    args = parser.parse_args(argv)
    if args.worker:
        return ref.run_as_worker(args, WORKERS)
    if args.profile:
        return profile(args, argv)
    return ref.compare_and_report(
        args,
        argv,
        module=MODULE,
        section=SECTION,
        targets=TARGETS,
        what="One step = forward of both towers in training mode, contrastive loss (label smoothing 0.1, mean of "
        "the two directions), backward, AdamW update. align_jax: the compiled `make_train_step` on one device; "
        "PyTorch: HF `AlignModel(return_loss=True)`, `backward()`, fused AdamW.",
    )


if __name__ == "__main__":
    main()
