"""Float32 matrix products on CPU through Intel MKL's `cblas_sgemm`, with gradients and sharding
rules, for `FlatDense` (BERT's and the Transformers' projections and MLPs, EfficientNet's 1x1
convolutions).

Why: on the Intel CPUs of benchmarks/RESULTS.md, MKL (which PyTorch calls) runs BERT-base's matmul
shapes at 400-450 GFLOP/s on two cores, XLA:CPU's YNNPACK at 290-380, and the matmuls are two
thirds of a BERT-heavy train step. MKL comes from the `mkl` wheel (`pip install align_jax[cpu]`,
x86-64 Linux); where it is absent, or on an accelerator, `FlatDense` keeps XLA's dot. Set
`ALIGN_JAX_BLAS` to a `libmkl_rt` path to choose the library, or to `xla` to turn this path off.

Sharding: the row dimension (batch x positions) keeps the first operand's mesh axes and every
other dimension is whole on each shard (an fsdp-sharded kernel is gathered, as XLA's dot would);
the kernel gradient contracts the rows, so each shard's product is summed over those axes (`psum`).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import kernels

log = logging.getLogger("align_jax.kernels")

BLAS_ENV = "ALIGN_JAX_BLAS"
_lock = threading.Lock()
_state: dict[str, object] = {}


def blas_path() -> Path | None:
    """The `libmkl_rt` to call: `$ALIGN_JAX_BLAS`, else the one the `mkl` wheel installed into this
    Python's prefix; None when there is none (or `ALIGN_JAX_BLAS=xla`)."""
    chosen = os.environ.get(BLAS_ENV, "")
    if chosen.lower() in ("xla", "none", "off", "0"):
        return None
    if chosen:
        return Path(chosen)
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
        if found:
            return Path(found[0])
    return None


def _load() -> None:
    kernels.load()
    path = blas_path()
    if path is None:
        chosen = f"{BLAS_ENV}={os.environ[BLAS_ENV]}" if os.environ.get(BLAS_ENV) else "nothing"
        raise kernels.NativeKernelError(
            f"no MKL found (pip install mkl, or set {BLAS_ENV} to a libmkl_rt path); {chosen} chosen"
        )
    try:
        blas = ctypes.CDLL(str(path))
        sgemm = ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p)
    except (OSError, AttributeError) as e:
        raise kernels.NativeKernelError(f"loading cblas_sgemm from {path} failed: {e}") from e
    # One thread per call: gemm.cc splits each product over XLA's own pool.
    blas.MKL_Set_Threading_Layer(1)  # MKL_THREADING_SEQUENTIAL
    library = kernels.library()
    library.AlignJaxSetSgemm.argtypes = [ctypes.c_void_p]
    library.AlignJaxSetSgemm(sgemm)
    _state.update(blas=blas, path=path)  # the CDLL stays referenced: its sgemm is in use
    log.info("float32 CPU matmuls through %s", path)


def load() -> None:
    """Load the native kernels and MKL, and hand the kernels MKL's sgemm; idempotent. Raises
    `kernels.NativeKernelError` naming the cause (the same one on every call)."""
    kernels.load_once(_state, _lock, _load)


def available() -> bool:
    """Whether the MKL path can be used here; logs why not, once."""
    return kernels.usable(_state, load, log.info, "CPU matmuls stay with XLA's dot")


def path_in_use() -> Path | None:
    """The MKL library the float32 CPU matmuls call, or None when they stay with XLA's dot."""
    return _state["path"] if available() else None


def _sgemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call("align_jax_gemm", jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b))


def _rows_axes(sharding) -> object:
    """The mesh axes of an operand's first (row) dimension, or None."""
    if not isinstance(sharding, NamedSharding) or not len(sharding.spec):
        return None
    return sharding.spec[0]


def _row_op(trans_b: bool):
    """[rows, k] x b -> [rows, n]: the rows keep their sharding, b is whole on each shard."""

    def local(a, b):
        return _sgemm(a, b, False, trans_b)

    op = custom_partitioning(local)

    def infer(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P(_rows_axes(arg_shapes[0].sharding), None))

    def partition(mesh, arg_shapes, result_shape):
        rows = _rows_axes(arg_shapes[0].sharding)
        shardings = (NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P(None, None)))
        return mesh, local, NamedSharding(mesh, P(rows, None)), shardings

    rule = "r k, n k -> r n" if trans_b else "r k, k n -> r n"
    op.def_partition(
        partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule, need_replication_factors=("k", "n")
    )
    return op


def _contract_rows_op():
    """a [rows, k], b [rows, n] -> a.T @ b [k, n]: each shard's product summed over the rows' axes."""

    def local(a, b):
        return _sgemm(a, b, True, False)

    op = custom_partitioning(local)

    def infer(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P(None, None))

    def partition(mesh, arg_shapes, result_shape):
        rows = _rows_axes(arg_shapes[0].sharding)

        def lower(a, b):
            out = local(a, b)
            return out if rows is None else jax.lax.psum(out, rows)

        shardings = (NamedSharding(mesh, P(rows, None)), NamedSharding(mesh, P(rows, None)))
        return mesh, lower, NamedSharding(mesh, P(None, None)), shardings

    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule="r k, r n -> k n",
        need_replication_factors=("k", "n"),
    )
    return op


_matmul = _row_op(trans_b=False)
_matmul_transposed = _row_op(trans_b=True)
_weight_gradient = _contract_rows_op()


@jax.custom_vjp
def blas_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [rows, k] @ w [k, n]` in float32 through MKL's sgemm (call `available()` first)."""
    return _matmul(x, w)


def _fwd(x, w):
    return _matmul(x, w), (x, w)


def _bwd(residuals, g):
    x, w = residuals
    g = g.astype(jnp.float32)
    return _matmul_transposed(g, w), _weight_gradient(x, g)


blas_matmul.defvjp(_fwd, _bwd)
