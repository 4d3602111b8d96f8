"""Shared by the benchmark scripts: emulated devices, JSON output, RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def emulate_devices(n: int) -> None:
    """Must run before jax is imported."""
    flag = f"--xla_force_host_platform_device_count={n}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_model() -> str:
    """The CPU's model name (figures from an AMD EPYC and an Intel Xeon differ several-fold)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host() -> str:
    return f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} cores"


def allocator() -> str:
    """This process's allocator settings as RESULTS.md states them (the step time on CPU depends
    on them: benchmarks/torch_reference.py)."""
    names = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
    settings = [f"`{name}={os.environ[name]}`" for name in names if os.environ.get(name)]
    return ", ".join(settings) or "glibc malloc's defaults"


def machine() -> str:
    import jax

    device = jax.devices()[0]
    return f"{host()}, {device.platform}: {device.device_kind}"


def write_section(name: str, markdown: str) -> None:
    """Replaces (or appends) the section `## name` of RESULTS.md."""
    text = (
        RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nProduced by the scripts in this folder.\n"
    )
    section = f"## {name}\n\n{markdown.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")


def print_json(result: dict) -> None:
    print(json.dumps(result, sort_keys=True))
