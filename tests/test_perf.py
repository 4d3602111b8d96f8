"""Throughput accounting: FLOPs from XLA, device peaks, MFU, durations."""

import jax
import jax.numpy as jnp
import pytest

from align_jax import perf


def test_step_flops_counts_a_matmul():
    a = jnp.ones((64, 32))
    b = jnp.ones((32, 16))
    flops = perf.step_flops(jax.jit(jnp.matmul).lower(a, b))
    assert flops == pytest.approx(2 * 64 * 32 * 16, rel=0.05)


def test_peak_is_known_for_accelerators_and_not_for_cpus():
    class Device:
        def __init__(self, kind):
            self.device_kind = kind

    assert perf.device_peak_flops(Device("TPU v4")) == 275e12
    assert perf.device_peak_flops(Device("TPU v5 lite")) == 197e12
    assert perf.device_peak_flops(Device("TPU v5p")) == 459e12
    assert perf.device_peak_flops(Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert perf.device_peak_flops(jax.devices("cpu")[0]) is None


def test_mfu_is_achieved_over_peak_flops():
    assert perf.mfu(1e12, 0.5, 4, 1e12) == pytest.approx(0.5)
    assert perf.mfu(None, 0.5, 4, 1e12) is None
    assert perf.mfu(1e12, 0.5, 4, None) is None


@pytest.mark.parametrize(
    "seconds, text", [(0, "0m00s"), (65, "1m05s"), (3 * 3600 + 5, "3h00m05s"), (26 * 3600 + 60, "1d02h01m")]
)
def test_format_duration(seconds, text):
    assert perf.format_duration(seconds) == text
