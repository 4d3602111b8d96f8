"""Every depthwise convolution of an EfficientNet at batch 32: align_jax's CPU lowering against HF's.

    python -m benchmarks.depthwise_layers [--variant b0] [--image_size 224] [--batch 32] [--layers 0,2]

Per MBConv block, the depthwise layer alone (no batch norm), on the block's real input shape:
align_jax's native CPU kernel (`align_jax.kernels.depthwise.native_depthwise`, what
`DepthwiseConv(impl="auto")` runs on CPU), its pure-JAX fallback `shifted_sum_depthwise`, and HF's
`AlignVisionDepthwiseConv2d` (PyTorch's depthwise convolution, channels_last, with HF's `ZeroPad2d`
before the stride-2 layers), each forward alone and forward + backward (input and kernel gradients).
Times are medians over `--repeats` calls of CPU milliseconds (user + system, all threads: the work)
and the best wall milliseconds. align_jax runs first in this process, then PyTorch (its OpenMP
threads spin for a while after each call, which would steal cores from XLA's pool). Run under the
same `GLIBC_TUNABLES` as the throughput scripts (benchmarks/torch_reference.py, ALLOCATOR_ENV).
Prints one JSON object as its last line and rewrites its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from benchmarks import common


def layer_shapes(variant: str, image_size: int) -> list[dict]:
    """(height, channels, kernel, stride, padding) of every block's depthwise layer, in order."""
    from align_jax.models import efficientnet

    specs = efficientnet.EfficientNet(**efficientnet.efficientnet_config(variant)).blocks()
    size = (image_size + 1 - 3) // 2 + 1  # the stem: ZeroPad2d((0, 1, 0, 1)), 3x3 stride 2
    layers = []
    for i, spec in enumerate(specs):
        padding = efficientnet.depthwise_padding(spec.kernel_size, spec.stride, spec.adjust_padding)
        channels = spec.in_dim * spec.expand_ratio
        layers.append(
            dict(block=i, size=size, channels=channels, kernel=spec.kernel_size, stride=spec.stride, padding=padding)
        )
        size = (size + sum(padding[0]) - spec.kernel_size) // spec.stride + 1
    return layers


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median CPU ms, best wall ms) of `repeats` calls after one untimed call; `fn` must block."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_start, start = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(cpu) * 1e3, min(wall) * 1e3


def jax_layer(layer: dict, batch: int, repeats: int, impl: str) -> dict:
    """`impl`: 'native' (the C++ kernel) or 'shifted_sum' (the pure-JAX fallback)."""
    import jax

    from align_jax.kernels.depthwise import native_depthwise
    from align_jax.models.efficientnet import shifted_sum_depthwise

    k, s, pad = layer["kernel"], layer["stride"], layer["padding"]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, layer["size"], layer["size"], layer["channels"]))
    kernel = jax.random.normal(keys[1], (k, k, 1, layer["channels"]))

    def conv(x, kernel):
        if impl == "native":
            return native_depthwise(x, kernel[:, :, 0], s, pad)
        return shifted_sum_depthwise(x, kernel, s, pad)

    forward = jax.jit(conv).lower(x, kernel).compile()
    g = jax.random.normal(keys[2], forward(x, kernel).shape)
    both = jax.jit(lambda x, kernel, g: jax.vjp(conv, x, kernel)[1](g)).lower(x, kernel, g).compile()
    fwd = measure(lambda: jax.block_until_ready(forward(x, kernel)), repeats)
    fwd_bwd = measure(lambda: jax.block_until_ready(both(x, kernel, g)), repeats)
    return dict(fwd_cpu_ms=fwd[0], fwd_wall_ms=fwd[1], fwd_bwd_cpu_ms=fwd_bwd[0], fwd_bwd_wall_ms=fwd_bwd[1])


def torch_layer(layer: dict, batch: int, repeats: int) -> dict:
    import torch
    from transformers.models.align.modeling_align import AlignVisionDepthwiseConv2d

    k, s, pad = layer["kernel"], layer["stride"], layer["padding"]
    conv = AlignVisionDepthwiseConv2d(
        layer["channels"], kernel_size=k, stride=s, padding="valid" if s == 2 else "same", bias=False
    ).to(memory_format=torch.channels_last)
    zero_pad = torch.nn.ZeroPad2d((pad[1][0], pad[1][1], pad[0][0], pad[0][1]))  # HF pads stride 2 only
    x = torch.randn(batch, layer["channels"], layer["size"], layer["size"]).to(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def forward():
        return conv(zero_pad(x) if s == 2 else x)

    with torch.no_grad():
        g = torch.randn_like(forward())

    def no_grad_forward():
        with torch.no_grad():
            forward()

    def forward_backward():
        x.grad = conv.weight.grad = None
        forward().backward(g)

    fwd = measure(no_grad_forward, repeats)
    fwd_bwd = measure(forward_backward, repeats)
    return dict(fwd_cpu_ms=fwd[0], fwd_wall_ms=fwd[1], fwd_bwd_cpu_ms=fwd_bwd[0], fwd_bwd_wall_ms=fwd_bwd[1])


def cell(times: dict, part: str) -> str:
    return f"{times[part + '_cpu_ms']:.0f} ({times[part + '_wall_ms']:.0f})"


def markdown(out: dict, command: str) -> str:
    rows = [
        "| block | input | kernel / stride | native fwd | PyTorch fwd | native fwd+bwd | shifted-sum fwd+bwd "
        "| PyTorch fwd+bwd | fwd+bwd ratio (CPU, PyTorch / native) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in out["layers"] + [dict(out["total"], block="total", size="", channels="", kernel="", stride="")]:
        shape = f"{r['size']}x{r['size']}x{r['channels']}" if r["size"] else ""
        kernel = f"{r['kernel']}x{r['kernel']} / {r['stride']}" if r["kernel"] else ""
        j, f, t = r["align_jax"], r["shifted_sum"], r["torch"]
        rows.append(
            f"| {r['block']} | {shape} | {kernel} | {cell(j, 'fwd')} | {cell(t, 'fwd')} | "
            f"{cell(j, 'fwd_bwd')} | {cell(f, 'fwd_bwd')} | {cell(t, 'fwd_bwd')} | "
            f"{t['fwd_bwd_cpu_ms'] / j['fwd_bwd_cpu_ms']:.2f} |"
        )
    return (
        f"`{command}` on {out['machine']}, batch {out['batch']}, float32, {out['threads']} threads. Each cell: "
        "median CPU ms (all threads) and, in brackets, the best wall ms of "
        f"{out['repeats']} calls. native: align_jax's C++ kernel (`align_jax/kernels/depthwise.cc`, what "
        "`DepthwiseConv` runs on CPU); shifted-sum: its pure-JAX fallback (`shifted_sum_depthwise`); PyTorch: HF's "
        "`AlignVisionDepthwiseConv2d`, channels_last, `ZeroPad2d` before stride 2. The ratio is PyTorch's CPU ms "
        "over the native kernel's (above 1: align_jax does less work).\n\n" + "\n".join(rows)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", default="", help="comma-separated block indices (default: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: all cores)")
    parser.add_argument("--no_results", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)

    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    layers = layer_shapes(args.variant, args.image_size)
    if args.layers:
        wanted = [int(i) for i in args.layers.split(",")]
        unknown = [i for i in wanted if not 0 <= i < len(layers)]
        if unknown:
            raise SystemExit(f"--layers {unknown}: {args.variant} has blocks 0..{len(layers) - 1}")
        layers = [layers[i] for i in wanted]
    from align_jax import kernels

    kernels.load()  # the native kernel is what is measured: fail here, naming why, if it cannot build
    for layer in layers:
        layer["align_jax"] = jax_layer(layer, args.batch, args.repeats, "native")
        layer["shifted_sum"] = jax_layer(layer, args.batch, args.repeats, "shifted_sum")
        print(f"block {layer['block']}: native {layer['align_jax']}", file=sys.stderr, flush=True)

    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    for layer in layers:
        layer["torch"] = torch_layer(layer, args.batch, args.repeats)
        print(f"block {layer['block']}: torch {layer['torch']}", file=sys.stderr, flush=True)

    keys = ("fwd_cpu_ms", "fwd_wall_ms", "fwd_bwd_cpu_ms", "fwd_bwd_wall_ms")
    total = {f: {k: sum(layer[f][k] for layer in layers) for k in keys} for f in ("align_jax", "shifted_sum", "torch")}
    out = dict(
        benchmark="depthwise_layers",
        machine=common.machine(),
        variant=args.variant,
        image_size=args.image_size,
        batch=args.batch,
        repeats=args.repeats,
        threads=threads,
        glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
        layers=[dict(layer, padding=[list(p) for p in layer["padding"]]) for layer in layers],
        total=total,
        fwd_bwd_cpu_ratio=total["torch"]["fwd_bwd_cpu_ms"] / total["align_jax"]["fwd_bwd_cpu_ms"],
    )
    if not args.no_results:
        command = " ".join(["python -m benchmarks.depthwise_layers", *(argv if argv is not None else sys.argv[1:])])
        common.write_section(
            f"Depthwise convolutions vs HF PyTorch (depthwise_layers.py, {args.variant})", markdown(out, command)
        )
    common.print_json(out)
    return out


if __name__ == "__main__":
    main()
