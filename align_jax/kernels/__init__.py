"""Native CPU kernels (C++ through XLA's FFI), compiled on first use and cached.

XLA:CPU has no fast depthwise convolution (its grouped-convolution lowering is 10x slower than
PyTorch's oneDNN kernel, and the pure-JAX fallback `shifted_sum_depthwise` spends most of an
EfficientNet training step in the kernel gradient), and its batch-norm backward materialises
intermediates that its reduction library calls cannot fuse (benchmarks/RESULTS.md). `depthwise.cc`
and `batchnorm.cc` hold those loops; `depthwise.py` and `batchnorm.py` give them gradients and
sharding rules. `gemm.cc` calls a BLAS sgemm (MKL's, which `gemm.py` loads) for float32 matmuls.
They are compiled with the system C++ compiler against the FFI headers jaxlib
ships, for this CPU (`-march=native`), into `$ALIGN_JAX_KERNEL_CACHE` (default
`~/.cache/align_jax/kernels`), keyed by the sources, jaxlib's version, the compiler and the CPU, so
a changed machine or jaxlib rebuilds instead of loading a stale library. No compiler means no
native kernels: `load()` raises `NativeKernelError` naming the cause, and the models' 'auto'
implementations (`DepthwiseConv`, `BatchNorm`) fall back to pure JAX.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("align_jax.kernels")

HERE = Path(__file__).parent
SOURCES = (HERE / "depthwise.cc", HERE / "batchnorm.cc", HERE / "gemm.cc")
HEADERS = (HERE / "parallel.h",)
TARGETS = {
    "align_jax_batch_norm_stats": "AlignJaxBatchNormStats",
    "align_jax_batch_norm_apply": "AlignJaxBatchNormApply",
    "align_jax_batch_norm_grad_stats": "AlignJaxBatchNormGradStats",
    "align_jax_batch_norm_input_grad": "AlignJaxBatchNormInputGrad",
    "align_jax_depthwise_forward": "AlignJaxDepthwiseForward",
    "align_jax_depthwise_input_gradient": "AlignJaxDepthwiseInputGradient",
    "align_jax_depthwise_kernel_gradient": "AlignJaxDepthwiseKernelGradient",
    "align_jax_gemm": "AlignJaxGemm",
}
# -fno-trapping-math: without AVX-512's masked compares, GCC will not if-convert the clamps in
# batchnorm.cc's exp (a float compare may trap), and the SiLU loops stay scalar: 4x slower on an
# AVX2 CPU (AMD EPYC). The kernels never rely on floating-point exceptions.
FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fno-trapping-math",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-w",
)

WHAT = "align_jax's CPU kernels"

_lock = threading.Lock()
_state: dict[str, object] = {}


class NativeKernelError(RuntimeError):
    """The native kernels cannot be built or loaded here (no compiler, a compile error, ...)."""


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_JAX_KERNEL_CACHE", "~/.cache/align_jax/kernels")).expanduser()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        raise NativeKernelError("no C++ compiler found (set CXX, or install g++) to build align_jax's CPU kernels")
    return cxx


def _cpu_fingerprint() -> str:
    """What `-march=native` compiles for: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def library_path(directory: Path | None = None) -> Path:
    """Where the compiled library for this source, jaxlib, compiler and CPU lives (in `directory`,
    default `cache_dir()`)."""
    import jaxlib

    key = hashlib.sha256()
    sources = [p.read_bytes() for p in SOURCES + HEADERS]
    for part in (*sources, jaxlib.__version__.encode(), _compiler().encode(), _cpu_fingerprint().encode()):
        key.update(part)
        key.update(b"\0")
    key.update(" ".join(FLAGS).encode())
    return (directory or cache_dir()) / f"align_jax_kernels-{key.hexdigest()[:16]}.so"


def build(directory: Path | None = None) -> Path:
    """Compile the kernels' sources into one library unless it is cached (in `directory`, default
    `cache_dir()`); returns its path."""
    import jax

    path = library_path(directory)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent builders (test workers) never load half a file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        command = [_compiler(), *FLAGS, "-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(out)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeKernelError(
                f"compiling align_jax's CPU kernels failed to run ({' '.join(command)}): {e}"
            ) from e
        if proc.returncode != 0:
            raise NativeKernelError(
                f"compiling align_jax's CPU kernels failed ({' '.join(command)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(out, path)
    log.info("built align_jax CPU kernels: %s", path)
    return path


def load_once(state: dict, lock: threading.Lock, body: Callable[[], None]) -> None:
    """Run `body` once per process under `lock`: later calls return, or raise the same
    `NativeKernelError` it raised (the loaders here and in gemm.py)."""
    with lock:
        if "error" in state:
            raise state["error"]
        if state.get("loaded"):
            return
        try:
            body()
        except NativeKernelError as e:
            state["error"] = e
            raise
        state["loaded"] = True


def usable(state: dict, load_fn: Callable[[], None], log_fn: Callable[..., None], fallback: str) -> bool:
    """Whether `load_fn` succeeds; logs why not (with what is used instead) once."""
    try:
        load_fn()
        return True
    except NativeKernelError as e:
        if not state.get("warned"):
            state["warned"] = True
            log_fn("%s: %s", fallback, e)
        return False


def _load() -> None:
    import jax

    try:
        library = ctypes.CDLL(str(build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:
        raise NativeKernelError(f"loading align_jax's CPU kernels failed: {e}") from e
    _state["library"] = library


def load() -> None:
    """Build (once per machine) and register the kernels with XLA's CPU backend; idempotent.
    Raises `NativeKernelError` (the same one on every call) when they cannot be had."""
    load_once(_state, _lock, _load)


def library() -> ctypes.CDLL:
    """The loaded kernels' library (after `load()`)."""
    load()
    return _state["library"]


def available() -> bool:
    """Whether the native kernels are (or can be) loaded; logs why not, once."""
    return usable(_state, load, log.warning, "native CPU kernels unavailable, using the pure-JAX fallback")
