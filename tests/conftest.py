"""Test setup: 8 emulated CPU devices, TF kept quiet and off accelerators, a compile cache."""

import os

# Must happen before jax initialises its backends.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

import align_jax.input  # noqa: E402,F401  (hides accelerators from TF)

# XLA compiles are slow on small CPUs; reuse them across test runs on the same machine.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("ALIGN_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/align_jax/xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from tests import fixtures  # noqa: E402

TEST_VOCAB = fixtures.TEST_VOCAB


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory) -> str:
    return fixtures.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")
