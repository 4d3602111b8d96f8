"""Throughput accounting for the training log: model FLOPs per step, device peaks, MFU, ETA."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s of one JAX device, by `device_kind` prefix (first match wins, so the
# more specific names come first). TPU v2/v3 expose each core as a device; later TPUs a chip.
PEAK_FLOPS = (
    ("TPU v2", 22.5e12),
    ("TPU v3", 61.5e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU7x", 2307e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GH200", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs: measure it, benchmarks/mfu.py)."""
    kind = (device or jax.devices()[0]).device_kind
    for prefix, flops in PEAK_FLOPS:
        if kind.startswith(prefix):
            return flops
    return None


def step_flops(lowered: jax.stages.Lowered) -> float | None:
    """Model FLOPs of one step of the whole (unpartitioned) program, from XLA's cost analysis."""
    try:
        analysis = lowered.cost_analysis()
    except Exception:  # some backends cannot analyse; MFU is then not reported
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: float | None, step_seconds: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices."""
    if not flops_per_step or not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (peak * num_devices)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours >= 24:
        return f"{hours // 24}d{hours % 24:02d}h{minutes:02d}m"
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
