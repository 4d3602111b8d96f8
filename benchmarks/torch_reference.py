"""align_jax against Hugging Face `AlignModel` (PyTorch, CPU): the matched configs, the HF model
built from an align_jax config, and the paired-rounds driver that train_throughput.py and
embed_throughput.py share.

Fairness rules (issue 8):
- The same model: the HF config is derived from ours field by field (`hf_config_dict`), and our
  configs are adjusted where HF cannot follow them (`matched_config`): drop-connect element-wise
  as HF implements it, and an embedding as wide as the image tower (HF has no image projection).
- The same inputs: one synthetic batch (`synthetic_batch`), uint8 pixels for align_jax (scaled on
  the device), the same pixels as float32 in [-1, 1] for PyTorch.
- Separate processes: every measurement is a fresh worker process, align_jax and PyTorch
  alternating which runs first in each round, so thread pools, allocator state and page caches
  do not leak from one into the other.
- The same environment: the workers get one allocator setting (`ALLOCATOR_ENV`: glibc malloc with
  mmap off and trimming off, so freed activations are reused instead of returned to the kernel and
  faulted in again) and the same cores (`--threads`; fewer than the machine's pins both to the
  first cores). PyTorch gets its best CPU settings: `torch.set_num_threads`, channels_last
  weights and pixels, oneDNN kernels (its default), fused AdamW; eager execution unless
  `--torch_mode inductor` (torch.compile). HF's ALIGN supports only its eager attention (no SDPA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
# glibc malloc for both frameworks: keep freed memory instead of returning it (mmap_max, trim), and
# back large blocks with transparent huge pages (hugetlb=1). Allocations over 64 MiB from a thread
# other than the main one are mmap'd whatever mmap_max says, so XLA:CPU's per-execution temp buffer
# (3.6 GB for the small config) is fresh memory each step: 900k page faults, 1.6 s of kernel time
# per 3.3 s step; with huge pages 2k faults and a 2.3 s step (benchmarks/RESULTS.md).
ALLOCATOR_ENV = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"
# `--malloc jemalloc`: both workers run under jemalloc (Debian's libjemalloc2) through LD_PRELOAD,
# configured to keep what is freed: no decay of dirty or muzzy pages, and no dedicated arena for
# allocations over 8 MiB (jemalloc 5's `oversize_threshold`, whose arena returns pages at once),
# so the per-step temp buffer comes back from the same pages every step. Not `thp:always`: with
# it align_jax's small step took 1.56 s instead of 1.25 (benchmarks/RESULTS.md, session 10).
JEMALLOC = "libjemalloc.so.2"
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
MALLOCS = ("glibc", "jemalloc")
CONFIGS = ("tiny", "small", "bert_heavy")
SEED = 0


# ----------------------------------------------------------------------------- configs


def matched_config(name: str):
    """Our model config `name` (benchmarks.mfu's tiny / small / bert_heavy) as HF can express it."""
    from align_jax.models import build_model
    from benchmarks.mfu import model_configs

    config = model_configs()[name]()
    config.dtype = "float32"
    # HF's port applies drop-connect as element-wise dropout; our presets drop whole examples.
    config.image.drop_connect_mode = "elementwise"
    # HF has no image projection: the embedding is the image tower's width (320 for B0 already;
    # the tiny preset's 80-wide tower otherwise projects to 64).
    config.embed_dim = build_model(config).image_tower.features
    return config


def hf_config_dict(config) -> dict:
    """The HF `AlignConfig` kwargs of the model an align_jax config describes (the inverse of
    `align_jax.tools.convert_hf.model_config_from_hf`)."""
    image, text = config.image, config.text
    activations = {"gelu": "gelu", "relu": "relu", "swish": "swish", "silu": "silu"}
    return dict(
        vision_config=dict(
            num_channels=3,
            image_size=int(config.image_size),
            width_coefficient=float(image.width_coefficient),
            depth_coefficient=float(image.depth_coefficient),
            depth_divisor=int(image.depth_divisor),
            kernel_sizes=list(image.kernel_sizes),
            in_channels=list(image.in_channels),
            out_channels=list(image.out_channels),
            strides=list(image.strides),
            num_block_repeats=list(image.num_block_repeats),
            expand_ratios=list(image.expand_ratios),
            depthwise_padding=list(image.depthwise_padding),
            squeeze_expansion_ratio=float(image.squeeze_expansion_ratio),
            hidden_act=image.activation,
            pooling_type=image.pooling,
            batch_norm_eps=float(image.bn_epsilon),
            drop_connect_rate=float(image.drop_connect_rate),
        ),
        text_config=dict(
            vocab_size=int(text.vocab_size),
            hidden_size=int(text.hidden_size),
            num_hidden_layers=int(text.num_layers),
            num_attention_heads=int(text.num_heads),
            intermediate_size=int(text.intermediate_size),
            hidden_act=activations[text.activation],
            hidden_dropout_prob=float(text.hidden_dropout),
            attention_probs_dropout_prob=float(text.attention_dropout),
            max_position_embeddings=int(text.max_position_embeddings),
            type_vocab_size=int(text.type_vocab_size),
            layer_norm_eps=float(text.layer_norm_eps),
        ),
        projection_dim=int(config.embed_dim),
        temperature_init_value=float(config.temperature_init),
    )


def synthetic_batch(config, batch: int) -> dict[str, np.ndarray]:
    """Random pixels (uint8, NHWC) and full-length token ids, the same in both workers."""
    rng = np.random.default_rng(SEED)
    size, length = config.image_size, config.max_text_length
    return dict(
        images=rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        input_ids=rng.integers(5, config.text.vocab_size, (batch, length), dtype=np.int32),
        attention_mask=np.ones((batch, length), np.int32),
    )


# ----------------------------------------------------------------------------- PyTorch side


def configure_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)


def build_hf_model(config):
    """A randomly initialised HF `AlignModel` of the same shape as `config`, channels_last."""
    import torch
    from transformers import AlignConfig, AlignModel

    model = AlignModel(AlignConfig(**hf_config_dict(config)))
    model.vision_model.to(memory_format=torch.channels_last)
    return model


def torch_inputs(batch: dict[str, np.ndarray]) -> dict:
    """Our batch as HF takes it: float pixels in [-1, 1] (NCHW, channels_last), int64 ids."""
    import torch

    pixels = torch.from_numpy(batch["images"].astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    return dict(
        pixel_values=pixels.contiguous(memory_format=torch.channels_last),
        input_ids=torch.from_numpy(batch["input_ids"].astype(np.int64)),
        attention_mask=torch.from_numpy(batch["attention_mask"].astype(np.int64)),
    )


def maybe_compile(fn: Callable, mode: str) -> tuple[Callable, str]:
    """`torch.compile(fn)` when `mode` is 'inductor', else `fn` ('eager')."""
    if mode == "eager":
        return fn, "eager"
    import torch

    return torch.compile(fn), "inductor"


# ----------------------------------------------------------------------------- JAX side


def one_device_mesh():
    import jax

    from align_jax.sharding import make_mesh

    return make_mesh([("data", -1), ("fsdp", 1)], devices=jax.devices()[:1])


# ----------------------------------------------------------------------------- timing


def time_steps(
    run_step: Callable[[], None], warmup: int, steps: int, cpu_times: list[float] | None = None
) -> list[float]:
    """Seconds per step of `steps` calls after `warmup` untimed ones (`run_step` must block).
    `cpu_times`, if given, receives each step's CPU seconds (user + system, all threads)."""
    for _ in range(warmup):
        run_step()
    times = []
    for _ in range(steps):
        cpu_start, start = time.process_time(), time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - cpu_start)
    return times


def jax_matmuls() -> str:
    """What align_jax's float32 CPU matmuls (`FlatDense`) ran on in this process."""
    import jax.numpy as jnp

    from align_jax.kernels import gemm
    from align_jax.models.layers import resolve_matmul_impl

    if resolve_matmul_impl("auto", jnp.float32) == "blas":
        return f"MKL sgemm ({gemm.path_in_use()})"
    return "XLA's dot"


def worker_result(
    framework: str, config_name: str, batch: int, times: list[float], cpu_times: list[float] = (), **extra
) -> dict:
    """One worker's JSON: wall seconds per step, img/s, and the median CPU seconds per step (how
    much work the step took on all threads, which the wall time hides when threads idle), and for
    align_jax what its float32 matmuls ran on."""
    if framework == "jax":
        extra.setdefault("matmuls", jax_matmuls())
    return dict(
        framework=framework,
        config=config_name,
        batch=batch,
        step_s=times,
        img_s=batch * len(times) / sum(times),
        cpu_s_per_step=statistics.median(cpu_times) if cpu_times else None,
        **extra,
    )


# ----------------------------------------------------------------------------- driver


def make_parser(doc: str, steps: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {CONFIGS}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two frameworks")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per worker, after warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per worker (after compilation)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--torch_mode",
        default="eager",
        choices=("eager", "inductor"),
        help="PyTorch execution: eager (oneDNN kernels) or torch.compile's inductor",
    )
    parser.add_argument(
        "--allocator_env",
        default=ALLOCATOR_ENV,
        help="GLIBC_TUNABLES given to both workers ('' leaves the environment's)",
    )
    parser.add_argument(
        "--malloc",
        default="glibc",
        choices=MALLOCS,
        help=f"the allocator of both workers: glibc's malloc, or {JEMALLOC} preloaded with MALLOC_CONF={JEMALLOC_CONF}",
    )
    parser.add_argument(
        "--wait_quiet",
        type=float,
        default=0.0,
        help="minutes (in all) to wait for the machine to be free of pytest runs before measuring",
    )
    parser.add_argument("--no_results", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set in the worker processes only
    return parser


def run_as_worker(args: argparse.Namespace, workers: dict[str, Callable]) -> dict:
    """In a worker process: measure one framework on one config, print the JSON line."""
    pin_threads(args.threads)
    if args.worker.startswith("torch"):
        configure_torch(args.threads)
    out = workers[args.worker](args.configs, args)
    common.print_json(out)
    return out


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of both workers: one allocator setting, one device, `threads` threads."""
    env = dict(os.environ)
    if args.allocator_env:
        env["GLIBC_TUNABLES"] = args.allocator_env
    for name in ("LD_PRELOAD", "MALLOC_CONF"):  # the allocator is --malloc's, not the caller's
        env.pop(name, None)
    env.update(malloc_env(args.malloc))
    # One CPU device (the test suite's emulated devices would split the batch).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = flags
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def malloc_env(malloc: str) -> dict[str, str]:
    """LD_PRELOAD (and MALLOC_CONF) that give a worker `malloc`; an error naming the package when
    the library is not on this machine."""
    if malloc == "glibc":
        return {}
    if malloc != "jemalloc":
        raise ValueError(f"unknown --malloc {malloc!r}; expected one of {MALLOCS}")
    path = find_shared_library(JEMALLOC)
    if path is None:
        raise FileNotFoundError(
            f"--malloc jemalloc: {JEMALLOC} is not installed (Debian/Ubuntu: apt-get install libjemalloc2)"
        )
    return {"LD_PRELOAD": path, "MALLOC_CONF": JEMALLOC_CONF}


def find_shared_library(soname: str) -> str | None:
    """The path of `soname` in the dynamic linker's cache, or None."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in listing.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.split(" ", 1)[0] == soname and os.path.exists(path):
            return path
    return None


def pin_threads(threads: int) -> None:
    """Fewer threads than cores: both frameworks run on the first `threads` cores (XLA sizes its
    pool from the affinity mask; PyTorch from `set_num_threads`)."""
    if threads < (os.cpu_count() or 1) and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(threads))


def run_worker(module: str, worker: str, config_name: str, args: argparse.Namespace) -> dict:
    """One fresh process running `worker` on one config; its last stdout line is JSON."""
    command = [sys.executable, "-m", module, "--worker", worker, "--configs", config_name]
    for flag in ("batch", "steps", "warmup", "threads", "torch_mode"):
        command += [f"--{flag}", str(getattr(args, flag))]
    proc = subprocess.run(command, capture_output=True, text=True, env=worker_env(args), cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{worker} worker for {config_name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")}


def busy_pytest() -> bool:
    """Whether a pytest run shares the machine (timings taken then are noisier)."""
    result = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True)
    own = {str(os.getpid()), str(os.getppid())}
    return any(pid not in own for pid in result.stdout.split())


class QuietMachine:
    """Runs workers while no pytest shares the machine: waits for quiet (polling every minute) up
    to `wait_minutes` in all, and repeats a measurement once if a pytest ran during it (polled
    every few seconds). When the wait is used up, measures anyway and counts it as busy."""

    def __init__(self, wait_minutes: float):
        self.deadline = time.monotonic() + 60 * wait_minutes
        self.busy_measurements = 0
        self._seen = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(5):
            if busy_pytest():
                self._seen.set()

    def run(self, measure: Callable[[], dict]) -> dict:
        for attempt in range(2):
            while busy_pytest() and time.monotonic() < self.deadline:
                time.sleep(60)
            self._seen.clear()
            if busy_pytest():
                self._seen.set()
            out = measure()
            if not self._seen.is_set():
                return out
            if time.monotonic() >= self.deadline or attempt == 1:
                break
            print("a pytest ran during the measurement: repeating it", file=sys.stderr, flush=True)
        self.busy_measurements += 1
        return dict(out, pytest_running=True)

    def close(self) -> None:
        self._stop.set()


def compare(module: str, args: argparse.Namespace, targets: dict[str, float]) -> dict:
    """`args.rounds` rounds per config, each a fresh align_jax and a fresh PyTorch worker, the
    order alternating; per config the medians over rounds of both img/s and ratio = align_jax /
    torch (and the median of the per-round ratios, which cancels slow drifts of the host)."""
    results = {}
    quiet = QuietMachine(args.wait_quiet)
    for name in args.configs.split(","):
        per = {"jax": [], "torch": []}
        for r in range(args.rounds):
            for framework in ("jax", "torch") if r % 2 == 0 else ("torch", "jax"):
                out = quiet.run(lambda framework=framework, name=name: run_worker(module, framework, name, args))
                per[framework].append(out)
                print(
                    f"{name} round {r}: {framework} {out['img_s']:.2f} img/s "
                    f"(median {statistics.median(out['step_s']) * 1e3:.0f} ms/step, "
                    f"slowest {max(out['step_s']) * 1e3:.0f})"
                    + (" (pytest running)" if out.get("pytest_running") else ""),
                    file=sys.stderr,
                    flush=True,
                )
        jax_img_s = statistics.median(o["img_s"] for o in per["jax"])
        torch_img_s = statistics.median(o["img_s"] for o in per["torch"])
        paired = statistics.median(j["img_s"] / t["img_s"] for j, t in zip(per["jax"], per["torch"], strict=True))
        entry = dict(
            align_jax_img_s=round(jax_img_s, 3),
            torch_img_s=round(torch_img_s, 3),
            ratio=round(jax_img_s / torch_img_s, 3),
            paired_ratio_median=round(paired, 3),
            align_jax_img_s_rounds=[round(o["img_s"], 3) for o in per["jax"]],
            torch_img_s_rounds=[round(o["img_s"], 3) for o in per["torch"]],
            align_jax_compile_s=statistics.median(o["compile_s"] for o in per["jax"]),
            align_jax_cpu_s_per_step=median_or_none(o.get("cpu_s_per_step") for o in per["jax"]),
            torch_cpu_s_per_step=median_or_none(o.get("cpu_s_per_step") for o in per["torch"]),
            torch_mode=per["torch"][0]["torch_mode"],
            align_jax_matmuls=per["jax"][0].get("matmuls", "-"),
        )
        if name in targets:
            entry["target_ratio"] = targets[name]
            entry["target_met"] = entry["ratio"] >= targets[name]
        results[name] = entry
    quiet.close()
    return dict(
        machine=common.host(),
        threads=args.threads,
        batch=args.batch,
        rounds=args.rounds,
        steps=args.steps,
        warmup=args.warmup,
        torch_mode=args.torch_mode,
        env=dict(
            GLIBC_TUNABLES=args.allocator_env or os.environ.get("GLIBC_TUNABLES", ""),
            malloc=args.malloc,
            **malloc_env(args.malloc),
        ),
        versions=versions(),
        pytest_running=quiet.busy_measurements > 0,
        measurements_with_pytest_running=quiet.busy_measurements,
        results=results,
    )


def median_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def results_markdown(summary: dict, command: str, what: str) -> str:
    """The RESULTS.md section: conditions, what one step is, the table."""
    v = summary["versions"]
    busy = (
        f"\n\n**A pytest suite was running on this machine during {summary['measurements_with_pytest_running']} "
        "of the worker measurements** (the script waits for a quiet machine up to `--wait_quiet` minutes in all, "
        "and had used them up), so those rates are lower and noisier than on an idle machine."
        if summary["pytest_running"]
        else "\n\nNo pytest run shared the machine during the measurements (polled every 5 s)."
    )

    def cpu(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    compile_s = ", ".join(f"{name} {r['align_jax_compile_s']:.0f} s" for name, r in summary["results"].items())
    matmuls = "; ".join(sorted({r.get("align_jax_matmuls", "-") for r in summary["results"].values()}))
    rows = [
        "| config | align_jax img/s | PyTorch img/s | ratio | median per-round ratio | target | met "
        "| align_jax CPU-s/step | PyTorch CPU-s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary["results"].items():
        target = f">= {r['target_ratio']}" if "target_ratio" in r else "-"
        met = ("yes" if r["target_met"] else "**no**") if "target_ratio" in r else "-"
        rows.append(
            f"| {name} | {r['align_jax_img_s']:.2f} | {r['torch_img_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['paired_ratio_median']:.2f} | {target} | {met} | {cpu(r.get('align_jax_cpu_s_per_step'))} | "
            f"{cpu(r.get('torch_cpu_s_per_step'))} |"
        )
    return (
        f"`{command}` on {summary['machine']} ({summary['threads']} threads), batch {summary['batch']}, float32, "
        f"{summary['rounds']} rounds x {summary['steps']} timed steps after {summary['warmup']} warm-up steps; "
        "each round runs align_jax and PyTorch in fresh processes, the order alternating; medians over rounds. "
        f"Both under {allocator_markdown(summary['env'])}. jax {v['jax']}, flax {v['flax']}, "
        f"optax {v['optax']}; torch {v['torch']}, transformers {v['transformers']}; PyTorch {summary['torch_mode']}, "
        f"channels_last, {summary['threads']} threads; align_jax's float32 matmuls: {matmuls}.{busy} "
        "CPU-s/step: median CPU seconds (user + system, "
        "all threads) per step; PyTorch's OpenMP threads spin while they wait, which counts as CPU time.\n\n"
        f"{what} align_jax compile time (excluded, median "
        f"per worker): {compile_s}.\n\n" + "\n".join(rows)
    )


def allocator_markdown(env: dict) -> str:
    """How both workers allocated memory, for RESULTS.md."""
    text = f"`GLIBC_TUNABLES={env['GLIBC_TUNABLES']}`"
    if env.get("LD_PRELOAD"):
        text = f"`LD_PRELOAD={env['LD_PRELOAD']}` with `MALLOC_CONF={env['MALLOC_CONF']}` ({text} for glibc itself)"
    return text


def compare_and_report(
    args: argparse.Namespace, argv: list[str] | None, *, module: str, section: str, targets: dict, what: str
) -> dict:
    """The comparison (`compare`), its RESULTS.md section (unless --no_results) and JSON line."""
    summary = compare(module, args, targets)
    summary["benchmark"] = module.rsplit(".", 1)[-1]
    command = " ".join(["python -m", module, *(argv if argv is not None else sys.argv[1:])])
    if not args.no_results:
        common.write_section(section, results_markdown(summary, command, what))
    common.print_json(summary)
    return summary
