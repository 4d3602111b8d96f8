"""The align_jax vs HF PyTorch throughput benchmarks: they run end to end and report what issue 8
asks for, on models that really are the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from transformers import AlignConfig

from align_jax.models import build_model, init_variables
from align_jax.tools import convert_hf
from benchmarks import common, torch_reference
from benchmarks.train_throughput import classify_op

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["--configs", "tiny", "--batch", "4", "--rounds", "1", "--steps", "1", "--warmup", "1", "--no_results"]


def run_benchmark(module: str) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    before = common.RESULTS.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", module, *SMOKE], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert common.RESULTS.read_text() == before  # --no_results leaves RESULTS.md alone
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["benchmarks.train_throughput", "benchmarks.embed_throughput"])
def test_script_prints_per_config_rates_and_ratio_as_its_last_line(module):
    out = run_benchmark(module)
    tiny = out["results"]["tiny"]
    assert tiny["align_jax_img_s"] > 0 and tiny["torch_img_s"] > 0
    assert tiny["ratio"] == pytest.approx(tiny["align_jax_img_s"] / tiny["torch_img_s"], rel=1e-2)
    assert tiny["align_jax_cpu_s_per_step"] > 0 and tiny["torch_cpu_s_per_step"] > 0
    assert out["env"]["GLIBC_TUNABLES"] == torch_reference.ALLOCATOR_ENV
    assert out["env"]["malloc"] == "glibc" and "LD_PRELOAD" not in out["env"]
    assert out["batch"] == 4 and out["rounds"] == 1


@pytest.mark.parametrize("name", torch_reference.CONFIGS)
def test_hf_config_describes_the_same_model(name, tmp_path):
    """Read back by the HF importer, the HF config gives our (matched) config again."""
    ours = torch_reference.matched_config(name)
    hf = AlignConfig(**torch_reference.hf_config_dict(ours)).to_dict()
    back = convert_hf.model_config_from_hf(hf, tmp_path / "config.json", ours.max_text_length)
    for field in ("embed_dim", "image_size", "max_text_length", "temperature_init"):
        assert back[field] == ours[field], field
    for field in back.image:
        if field != "bn_momentum":  # PyTorch semantics differ; no effect on speed
            assert back.image[field] == ours.image[field], field
    for field in back.text:
        assert back.text[field] == ours.text[field], field


def test_tiny_models_have_the_same_parameters():
    config = torch_reference.matched_config("tiny")
    model = build_model(config)
    abstract = jax.eval_shape(lambda: init_variables(model, config, jax.random.key(0)))
    ours = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    hf = torch_reference.build_hf_model(config)
    # HF's BERT pooler is built but unused by ALIGN.
    theirs = sum(p.numel() for n, p in hf.named_parameters() if not n.startswith("text_model.pooler."))
    assert ours == theirs


FWD = "jit(step)/jvp(DualEncoder.encode_{})/{}_tower"
BWD = "jit(step)/transpose(jvp(DualEncoder.encode_{}))/{}_tower"


@pytest.mark.parametrize(
    "op_name, expected",
    [
        (FWD.format("image", "image") + "/block_1/expand_conv/dot_general", ("image", "fwd", "expand_conv")),
        (BWD.format("image", "image") + "/block_12/depthwise_conv/pad", ("image", "bwd", "depthwise_conv")),
        (BWD.format("text", "text") + "/layer_3/attention/query/dot_general", ("text", "bwd", "attention/query")),
        (FWD.format("text", "text") + "/layer_0/output/dot_general", ("text", "fwd", "output")),
        (FWD.format("text", "text") + "/layer_0/output_ln/add", ("text", "fwd", "output_ln")),
        ("jit(step)/transpose(jvp())/jit(take_along_axis)/scatter-add", ("loss+optimizer", "bwd", "loss")),
        ("jit(step)/sqrt", ("loss+optimizer", "update", "optimizer, metrics")),
    ],
)
def test_trace_attributes_operations_to_tower_pass_and_layer(op_name, expected):
    assert classify_op(op_name) == expected


def test_step_timing_reports_cpu_seconds_apart_from_wall_seconds():
    import time

    def busy():  # 0.2 s of this thread's CPU time, however long the machine makes it take
        end = time.thread_time() + 0.2
        while time.thread_time() < end:
            pass

    cpu = []
    wall = torch_reference.time_steps(busy, warmup=1, steps=2, cpu_times=cpu)
    assert len(wall) == len(cpu) == 2 and all(w >= 0.2 for w in wall) and all(c >= 0.2 for c in cpu)
    result = torch_reference.worker_result("jax", "tiny", 4, wall, cpu)
    assert result["cpu_s_per_step"] == pytest.approx((cpu[0] + cpu[1]) / 2)
    idle = []
    wall = torch_reference.time_steps(lambda: time.sleep(0.2), warmup=0, steps=2, cpu_times=idle)
    assert all(w >= 0.2 for w in wall) and all(c < 0.1 for c in idle)  # waiting is not work
    assert torch_reference.worker_result("jax", "tiny", 4, wall)["cpu_s_per_step"] is None


def test_depthwise_layer_shapes_are_the_ones_the_model_convolves():
    import flax.linen as nn
    import jax.numpy as jnp

    from align_jax.models import efficientnet
    from benchmarks.depthwise_layers import layer_shapes

    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, efficientnet.DepthwiseConv) and context.method_name == "__call__":
            m, (x,) = context.module, args
            seen.append(dict(size=x.shape[1], channels=x.shape[3], kernel=m.kernel_size, stride=m.stride))
            assert x.shape[1] == x.shape[2]
            seen[-1]["padding"] = m.padding
        return next_fun(*args, **kwargs)

    model = efficientnet.EfficientNet(**efficientnet.efficientnet_config("b0"))
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    expected = [{k: v for k, v in layer.items() if k != "block"} for layer in layer_shapes("b0", 224)]
    assert seen == expected and len(seen) == 16


def test_depthwise_script_compares_both_frameworks_per_layer():
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    before = common.RESULTS.read_text()
    command = [sys.executable, "-m", "benchmarks.depthwise_layers", "--layers", "1,15", "--batch", "2"]
    proc = subprocess.run(
        [*command, "--repeats", "1", "--no_results"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert common.RESULTS.read_text() == before
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [layer["block"] for layer in out["layers"]] == [1, 15]
    for framework in ("align_jax", "shifted_sum", "torch"):  # align_jax: the native kernel
        for layer in out["layers"]:
            assert layer[framework]["fwd_bwd_cpu_ms"] > 0 and layer[framework]["fwd_wall_ms"] > 0
        total = sum(layer[framework]["fwd_bwd_cpu_ms"] for layer in out["layers"])
        assert out["total"][framework]["fwd_bwd_cpu_ms"] == pytest.approx(total)
    bad = subprocess.run([*command[:3], "--layers", "16"], capture_output=True, text=True, cwd=REPO, env=env)
    assert bad.returncode != 0 and "b0 has blocks 0..15" in bad.stderr


def test_malloc_env_preloads_jemalloc_into_a_worker_or_names_the_missing_package(monkeypatch):
    assert torch_reference.malloc_env("glibc") == {}
    with pytest.raises(ValueError, match="unknown --malloc 'tcmalloc'"):
        torch_reference.malloc_env("tcmalloc")
    assert torch_reference.find_shared_library("libc.so.6") is not None
    if torch_reference.find_shared_library(torch_reference.JEMALLOC) is None:
        pytest.skip(f"{torch_reference.JEMALLOC} is not installed here (apt-get install libjemalloc2)")
    env = torch_reference.malloc_env("jemalloc")
    assert env["MALLOC_CONF"] == torch_reference.JEMALLOC_CONF
    # A process started with it runs jemalloc (mapped, and reading its options) in place of glibc's malloc.
    probe = (
        "import ctypes; print(open('/proc/self/maps').read()); ctypes.CDLL(None).malloc_stats_print(None, None, None)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=dict(os.environ, **env), timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert env["LD_PRELOAD"] in proc.stdout
    assert "opt.oversize_threshold: 0" in proc.stderr and "opt.dirty_decay_ms: -1" in proc.stderr
    monkeypatch.setattr(torch_reference, "JEMALLOC", "libnot-a-malloc.so.9")
    with pytest.raises(FileNotFoundError, match="libnot-a-malloc.so.9 is not installed .*libjemalloc2"):
        torch_reference.malloc_env("jemalloc")


def test_allocator_line_names_the_settings_the_process_runs_under(monkeypatch):
    for name in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert common.allocator() == "glibc malloc's defaults"
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    monkeypatch.setenv("LD_PRELOAD", "/lib/libjemalloc.so.2")
    assert common.allocator() == "`LD_PRELOAD=/lib/libjemalloc.so.2`, `MALLOC_CONF=dirty_decay_ms:-1`"
