"""Memory and time of the all-gather and the chunked (ring) softmax losses, forward + backward.

    python benchmarks/loss_memory.py [--sizes 4096,16384,65536] [--devices 8] [--dim 640]

Per device, XLA's compiled temporary memory (memory analysis of the SPMD program) and the
median wall time of `value_and_grad` on emulated CPU devices; a configuration whose estimated
footprint on this host exceeds --max_host_gib is compiled (for memory) but not run. Prints one
JSON object as its last line and rewrites its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="4096,16384,65536")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--dim", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk_size", type=int, default=512, help="columns per block of the chunked loss")
    parser.add_argument("--max_host_gib", type=float, default=12.0)
    parser.add_argument("--no_write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    common.emulate_devices(args.devices)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from align_jax import losses

    axes = ("data",)
    mesh = jax.make_mesh((args.devices,), axes, axis_types=(jax.sharding.AxisType.Auto,))
    variants = {
        "all_gather": losses.softmax_contrastive_loss,
        "chunked": functools.partial(losses.chunked_softmax_contrastive_loss, chunk_size=args.chunk_size),
    }
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        spec = NamedSharding(mesh, P(axes))
        key1, key2 = jax.random.split(jax.random.key(size))
        images = jax.device_put(jax.random.normal(key1, (size, args.dim)) / args.dim**0.5, spec)
        texts = jax.device_put(jax.random.normal(key2, (size, args.dim)) / args.dim**0.5, spec)
        temperature = jnp.float32(0.05)
        for name, loss in variants.items():
            fn = jax.shard_map(
                functools.partial(loss, axis_name=axes),
                mesh=mesh,
                in_specs=(P(axes), P(axes), P()),
                out_specs=P(),
            )
            step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
            compiled = step.lower(images, texts, temperature).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            row = dict(global_batch=size, loss=name, temp_bytes_per_device=temp, seconds=None)
            if temp * args.devices <= args.max_host_gib * 2**30:
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(compiled(images, texts, temperature))
                    times.append(time.perf_counter() - start)
                    if times[0] > 20:  # a long run is its own measurement
                        break
                row["seconds"] = statistics.median(times)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)

    by_size = {}
    for row in rows:
        by_size.setdefault(row["global_batch"], {})[row["loss"]] = row
    ratios = {
        str(size): pair["all_gather"]["temp_bytes_per_device"] / max(1, pair["chunked"]["temp_bytes_per_device"])
        for size, pair in by_size.items()
    }
    result = dict(
        benchmark="loss_memory",
        devices=args.devices,
        dim=args.dim,
        machine=common.machine(),
        rows=rows,
        memory_ratio_all_gather_over_chunked=ratios,
    )
    if not args.no_write:
        lines = [
            f"`python benchmarks/loss_memory.py` on {result['machine']}, {args.devices} emulated devices, "
            f"{args.dim}-d embeddings, value and gradients of the loss. Memory: XLA's compiled temporary "
            f"bytes per device. The chunked loss scores {args.chunk_size} columns at a time. Time: median "
            f"of {args.repeats} runs after compilation (one run when it takes over 20 s; not run where "
            f"the {args.devices} emulated devices would need more than {args.max_host_gib:g} GiB of this host).",
            "",
            "| global batch | all-gather temp / device | chunked temp / device | ratio | all-gather s | chunked s |",
            "|---|---|---|---|---|---|",
        ]
        for size, pair in by_size.items():
            a, c = pair["all_gather"], pair["chunked"]
            fmt = lambda s: "not run" if s is None else f"{s:.3f}"  # noqa: E731
            mib = lambda row: f"{row['temp_bytes_per_device'] / 2**20:.1f} MiB"  # noqa: E731
            lines.append(
                f"| {size} | {mib(a)} | {mib(c)} | {ratios[str(size)]:.1f}x "
                f"| {fmt(a['seconds'])} | {fmt(c['seconds'])} |"
            )
        common.write_section("Contrastive loss memory (loss_memory.py)", "\n".join(lines))
    common.print_json(result)


if __name__ == "__main__":
    main()
