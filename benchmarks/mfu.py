"""Train-step throughput and model FLOPs utilisation on whatever devices JAX sees.

Model FLOPs per step come from XLA's cost analysis of the compiled step (forward, backward and
optimizer update, the whole global batch); the peak is measured here with a large matrix product
in the step's compute dtype (bf16 on accelerators, float32 on CPU), so MFU is against what this
machine really does, and also reported against the datasheet peak where `align_jax.perf` knows the
device. Synthetic batches (random pixels and tokens, full-length captions): this measures the
device step, not the input pipeline (benchmarks/input_pipeline.py does that).

    python -m benchmarks.mfu --configs small,bert_heavy               # this CPU
    python -m benchmarks.mfu --configs align_base --dtype bfloat16 --batch 128   # one GPU / TPU host

Needs no TensorFlow (only the model, loss, optimizer and sharding), so it runs on accelerator
machines with a bare JAX install plus ml_collections.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

from benchmarks import common


def model_configs():
    from align_jax.models import presets
    from align_jax.models.bert import bert_config

    def bert_heavy():
        # A small image tower and BERT-base text at length 64: the text side dominates the FLOPs.
        config = presets.small()
        config.text = bert_config("base", presets.BERT_VOCAB_SIZE)
        config.max_text_length = 64
        return config

    return dict(tiny=presets.tiny, small=presets.small, bert_heavy=bert_heavy, align_base=presets.align_base)


def measure_peak_flops(dtype: str, size: int, repeats: int = 10) -> float:
    """FLOP/s of a `size`^3 matrix product on one device (median of `repeats` timed runs)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 2)
    a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def synthetic_batch(batch: int, image_size: int, text_length: int, vocab_size: int, mesh):
    import jax
    import numpy as np

    from align_jax.sharding import batch_sharding

    rng = np.random.default_rng(0)
    host = dict(
        images=rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8),
        input_ids=rng.integers(5, vocab_size, (batch, text_length), dtype=np.int32),
        attention_mask=np.ones((batch, text_length), np.int32),
    )
    return jax.device_put(host, batch_sharding(mesh))


def bench_config(name: str, model_config, batch: int, steps: int, windows: int) -> dict:
    """Compile the train step once, then time `windows` windows of `steps` steps each."""
    import jax

    from align_jax import optim, train_step
    from align_jax.models import build_model
    from align_jax.sharding import make_mesh

    mesh = make_mesh([("data", -1), ("fsdp", 1)])
    model = build_model(model_config)
    opt_config = optim.default_config()
    opt_config.warmup_steps = 10
    tx, schedule = optim.make_optimizer(opt_config, 1_000_000)
    state, shardings = train_step.create_train_state(model, model_config, tx, mesh, jax.random.key(0))
    step = train_step.make_train_step(model, train_step.default_loss_config(), tx, schedule, mesh, shardings)
    data = synthetic_batch(
        batch, model_config.image_size, model_config.max_text_length, model_config.text.vocab_size, mesh
    )

    start = time.perf_counter()
    lowered = step.jitted.lower(state, data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = train_step.model_flops(step, lowered, state, data)  # XLA's dots: FFI calls count 0
    memory = compiled.memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = int(
            getattr(memory, "temp_size_in_bytes", 0)
            + getattr(memory, "argument_size_in_bytes", 0)
            + getattr(memory, "output_size_in_bytes", 0)
            - getattr(memory, "alias_size_in_bytes", 0)
        )

    for _ in range(2):  # warm-up (the first call also places the donated state)
        state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps)
    step_s = statistics.median(times)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return dict(
        config=name,
        batch=batch,
        dtype=model_config.dtype,
        image_size=model_config.image_size,
        text_length=model_config.max_text_length,
        params_m=round(params / 1e6, 2),
        compile_s=round(compile_s, 1),
        step_s=step_s,
        step_s_windows=times,
        img_s=batch / step_s,
        flops_per_step=flops,
        tflops_s=flops / step_s / 1e12 if flops else None,
        compiled_peak_gib=round(peak_bytes / 2**30, 2) if peak_bytes else None,
        loss=float(metrics["loss"]),
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,bert_heavy")
    parser.add_argument("--dtype", default="", help="compute dtype (default: bfloat16 on accelerators, else float32)")
    parser.add_argument("--batch", default="32", help="global batch, or one per config: 32,32,128")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1, help="emulated CPU devices (CPU only)")
    parser.add_argument("--peak_size", type=int, default=0, help="matmul size for the peak (default by platform)")
    parser.add_argument("--no_results", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)

    import os

    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") and args.devices > 1:
        common.emulate_devices(args.devices)
    import jax

    from align_jax import perf

    accelerator = jax.devices()[0].platform != "cpu"
    dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    measured_peak = measure_peak_flops(dtype, args.peak_size or (8192 if accelerator else 2048))
    spec_peak = perf.device_peak_flops()
    names = args.configs.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    batches = batches * len(names) if len(batches) == 1 else batches
    registry = model_configs()
    results = []
    for name, batch in zip(names, batches, strict=True):
        model_config = registry[name]()
        model_config.dtype = dtype
        try:
            r = bench_config(name, model_config, batch, args.steps, args.windows)
        except Exception as e:  # one config failing (e.g. out of memory) must not lose the others
            traceback.print_exc()
            results.append(dict(config=name, batch=batch, dtype=dtype, error=f"{type(e).__name__}: {e}"[:500]))
            continue
        n = jax.device_count()
        r["mfu_vs_measured_peak"] = perf.mfu(r["flops_per_step"], r["step_s"], n, measured_peak)
        r["mfu_vs_spec_peak"] = perf.mfu(r["flops_per_step"], r["step_s"], n, spec_peak) if spec_peak else None
        print(
            f"{name}: batch {batch} {dtype}: {r['img_s']:.1f} img/s, {r['step_s'] * 1e3:.1f} ms/step, "
            f"MFU {r['mfu_vs_measured_peak'] or 0:.3f} of measured peak",
            file=sys.stderr,
        )
        results.append(r)

    out = dict(
        benchmark="mfu",
        machine=common.machine(),
        allocator=common.allocator(),
        devices=jax.device_count(),
        jax=jax.__version__,
        dtype=dtype,
        measured_peak_tflops=measured_peak / 1e12,
        spec_peak_tflops=spec_peak / 1e12 if spec_peak else None,
        results=results,
    )
    if not args.no_results:
        rows = [
            "| config | batch | dtype | img/s | ms/step | model TFLOP/step | TFLOP/s | MFU (measured peak) | "
            "MFU (spec peak) | compile s | compiled peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in results:
            if "error" in r:
                rows.append(f"| {r['config']} | {r['batch']} | {r['dtype']} | failed: {r['error'][:80]} |")
                continue
            spec = f"{r['mfu_vs_spec_peak']:.3f}" if r["mfu_vs_spec_peak"] else "-"
            rows.append(
                f"| {r['config']} | {r['batch']} | {r['dtype']} | {r['img_s']:.1f} | {r['step_s'] * 1e3:.1f} | "
                f"{(r['flops_per_step'] or 0) / 1e12:.3f} | {r['tflops_s'] or 0:.3f} | "
                f"{r['mfu_vs_measured_peak'] or 0:.3f} | {spec} | {r['compile_s']} | {r['compiled_peak_gib']} |"
            )
        peak_line = f"Measured {dtype} matmul peak: {measured_peak / 1e12:.3f} TFLOP/s"
        if spec_peak:
            peak_line += f"; datasheet dense bf16 peak {spec_peak / 1e12:.0f} TFLOP/s"
        common.write_section(
            f"Train-step MFU: {jax.devices()[0].device_kind} x{jax.device_count()}, {dtype}",
            f"`python -m benchmarks.mfu {' '.join(argv or sys.argv[1:])}` on {out['machine']}, jax {jax.__version__}, "
            f"under {common.allocator()}. {peak_line}. Synthetic batches, LAMB, softmax loss.\n\n" + "\n".join(rows),
        )
    common.print_json(out)
    return out


if __name__ == "__main__":
    main()
