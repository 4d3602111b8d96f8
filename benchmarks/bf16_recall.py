"""Does bf16 compute train as well as float32? The demo config (tiny model, demo data, 1200 steps)
trained twice, `model.dtype` float32 and bfloat16 (parameters, optimizer state, embeddings,
logits and loss stay float32 either way), compared on held-out recall and zero-shot accuracy.

    python -m benchmarks.bf16_recall [--workdir_root workdirs/bf16_recall] [--margin 0.05]

A finished workdir is only re-evaluated, so a rerun is cheap; delete the folder to retrain.
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
COMPARED = (
    "retrieval/i2t_r1",
    "retrieval/i2t_r5",
    "retrieval/t2i_r1",
    "retrieval/t2i_r5",
    "zeroshot/top1",
    "zeroshot/top5",
    "image_text/r1",
    "image_text/r10",
)


def train(workdir: str, dtype: str) -> tuple[dict, float, float | None]:
    """(final metrics, wall seconds, median logged step time) of the demo run in `workdir`."""
    command = [
        sys.executable,
        "-m",
        "align_jax.train",
        "--config",
        os.path.join(REPO, "configs", "demo.py"),
        "--workdir",
        workdir,
        f"--config.model.dtype={dtype}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{dtype} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    step_times = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        step_times = [r["step_time"] for r in map(json.loads, f) if "step_time" in r]
    step_times.sort()
    return result, seconds, step_times[len(step_times) // 2] if step_times else None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir_root", default=os.path.join(REPO, "workdirs", "bf16_recall"))
    parser.add_argument("--margin", type=float, default=0.05, help="largest allowed drop of each metric")
    parser.add_argument(
        "--float32_workdir", default="", help="reuse this demo run as the float32 one (e.g. workdirs/demo)"
    )
    parser.add_argument("--no_results", action="store_true")
    args = parser.parse_args(argv)

    runs = {}
    for dtype in ("float32", "bfloat16"):
        workdir = os.path.join(args.workdir_root, dtype)
        if dtype == "float32" and args.float32_workdir:
            workdir = args.float32_workdir
        metrics, seconds, step_time = train(workdir, dtype)
        runs[dtype] = dict(metrics={k: metrics[k] for k in COMPARED}, wall_s=round(seconds, 1), step_s=step_time)
        print(f"{dtype}: {json.dumps(runs[dtype])}", file=sys.stderr)
    deltas = {k: runs["bfloat16"]["metrics"][k] - runs["float32"]["metrics"][k] for k in COMPARED}
    out = dict(
        benchmark="bf16_recall",
        machine=_machine(),
        margin=args.margin,
        runs=runs,
        bf16_minus_f32=deltas,
        within_margin=all(d >= -args.margin for d in deltas.values()),
    )
    if not args.no_results:
        command_args = " ".join(argv if argv is not None else sys.argv[1:])
        rows = ["| metric | float32 | bfloat16 | bf16 - f32 |", "| --- | --- | --- | --- |"]
        for k in COMPARED:
            f32, bf16 = runs["float32"]["metrics"][k], runs["bfloat16"]["metrics"][k]
            rows.append(f"| {k} | {f32:.4f} | {bf16:.4f} | {bf16 - f32:+.4f} |")
        common.write_section(
            "bf16 compute: held-out quality (bf16_recall.py)",
            f"`python -m benchmarks.bf16_recall {command_args}` on {out['machine']}: "
            "the demo config (tiny model, 1200 steps, "
            f"batch 64) trained in float32 and with bf16 compute. Within the margin ({args.margin} per metric): "
            f"**{out['within_margin']}**. (bf16 is for accelerators; on this CPU it is not faster, and the "
            "step times in the JSON were taken with other jobs running.)\n\n" + "\n".join(rows),
        )
    common.print_json(out)
    return out


def _machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
