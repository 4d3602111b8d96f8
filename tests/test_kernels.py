"""The native CPU depthwise kernels (align_jax/kernels): equal to XLA's grouped convolution with
both gradients, on one device and sharded over emulated devices; built once and cached; a
machine that cannot build them falls back and says why."""

import collections
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from align_jax import kernels
from align_jax.kernels import gemm
from align_jax.kernels.depthwise import native_depthwise
from align_jax.models import efficientnet as enet
from align_jax.models import layers
from align_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grouped_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
        precision=jax.lax.Precision.HIGHEST,
    )


def _value_and_grads(fn, x, kernel, cotangent, stride, padding):
    def loss(x, kernel):
        return jnp.vdot(fn(x, kernel, stride, padding), cotangent)

    return fn(x, kernel, stride, padding), jax.grad(loss, argnums=(0, 1))(x, kernel)


@pytest.mark.parametrize(
    "size,channels,kernel_size,stride,padding",
    [
        (9, 5, 3, 1, ((1, 1), (1, 1))),
        (10, 16, 3, 2, ((0, 1), (0, 1))),  # HF's adjusted stride-2 padding
        (11, 70, 5, 2, ((1, 2), (1, 2))),  # odd size (last padded row unread); a 64-channel block + 6
        (12, 130, 5, 2, ((2, 2), (2, 2))),
        (7, 3, 5, 1, ((2, 2), (2, 2))),
        (8, 8, 3, 2, ((0, 0), (1, 0))),  # asymmetric and unpadded axes
        (6, 4, 3, 1, ((0, 0), (0, 0))),  # no padding at all
    ],
)
def test_native_depthwise_equals_grouped_convolution_with_gradients(size, channels, kernel_size, stride, padding):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (3, size, size + 1, channels))
    kernel = jax.random.normal(keys[1], (kernel_size, kernel_size, channels))
    cotangent = jax.random.normal(keys[2], _grouped_conv(x, kernel, stride, padding).shape)
    want, want_grads = _value_and_grads(_grouped_conv, x, kernel, cotangent, stride, padding)
    run = jax.jit(lambda x, k: _value_and_grads(native_depthwise, x, k, cotangent, stride, padding))
    got, got_grads = run(x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [P(("data", "fsdp")), P("data", None, None, "fsdp")])
def test_native_depthwise_sharded_equals_one_device(spec):
    """Batch (and channel) sharded over 8 emulated devices: each shard runs the kernel on its own
    examples; values and gradients equal the one-device call."""
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    keys = jax.random.split(jax.random.key(1), 3)
    stride, padding = 2, ((0, 1), (0, 1))
    x = jax.random.normal(keys[0], (8, 10, 10, 6))
    kernel = jax.random.normal(keys[1], (3, 3, 6))
    cotangent = jax.random.normal(keys[2], (8, 5, 5, 6))
    want, want_grads = jax.jit(lambda x, k: _value_and_grads(native_depthwise, x, k, cotangent, stride, padding))(
        x, kernel
    )
    sharding = NamedSharding(mesh, spec)
    step = jax.jit(
        lambda x, k, c: _value_and_grads(native_depthwise, x, k, c, stride, padding),
        in_shardings=(sharding, NamedSharding(mesh, P()), sharding),
    )
    lowered = step.lower(x, kernel, cotangent)
    hlo = lowered.compile().as_text()
    # The forward runs on each device's rows only: a per-device [1 or 2, 10, 10, 3 or 6] operand.
    local = x.shape[0] // 8 if spec == P(("data", "fsdp")) else x.shape[0] // 4
    channels = 6 if spec == P(("data", "fsdp")) else 3
    assert f"f32[{local},10,10,{channels}]" in hlo and "align_jax_depthwise_forward" in hlo
    got, got_grads = step(x, kernel, cotangent)
    assert got.sharding.is_equivalent_to(sharding, got.ndim)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_auto_is_native_on_cpu_and_equals_every_impl():
    assert enet.resolve_depthwise_impl("auto", jnp.float32) == "native"
    assert enet.resolve_depthwise_impl("auto", jnp.bfloat16) == "shifted_sum"  # the kernels are float32
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 12))
    layer = enet.DepthwiseConv(5, 2, ((1, 2), (1, 2)), impl="native")
    variables = layer.init(jax.random.key(3), x)
    assert variables["params"]["kernel"].shape == (5, 5, 1, 12)  # nn.Conv's layout whatever runs
    want = enet.DepthwiseConv(5, 2, ((1, 2), (1, 2)), impl="conv").apply(variables, x)
    for impl in ("native", "shifted_sum", "auto"):
        got = enet.DepthwiseConv(5, 2, ((1, 2), (1, 2)), impl=impl).apply(variables, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="float32"):
        enet.DepthwiseConv(5, 2, ((1, 2), (1, 2)), impl="native", dtype=jnp.bfloat16).apply(variables, x)


def test_kernel_shape_mismatch_is_an_error_naming_it():
    from align_jax.kernels import depthwise

    x = jnp.ones((1, 5, 5, 4))
    with pytest.raises(Exception, match="inconsistent shapes"):
        # A kernel for 3 channels applied to 4: the handler checks what XLA hands it.
        jax.block_until_ready(depthwise._forward_local(x, jnp.ones((3, 3, 3)), 1, ((1, 1), (1, 1))))


def test_library_is_cached_by_source_and_machine(tmp_path):
    # A directory argument, not $ALIGN_JAX_KERNEL_CACHE: the background lane's subprocesses copy
    # this process's environment and would build into tmp_path too.
    path = kernels.build(tmp_path)
    assert path.parent == tmp_path and path.exists()
    built = path.stat().st_mtime_ns
    assert kernels.build(tmp_path) == path and path.stat().st_mtime_ns == built  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


def test_marked_channel_loops_vectorise_on_this_cpu(tmp_path):
    """Every loop the sources mark `#pragma GCC ivdep` compiles to vector code with the build's
    flags on this CPU. Without AVX-512 (e.g. AMD EPYC), GCC left batchnorm.cc's SiLU loops scalar
    until -fno-trapping-math let it if-convert exp's clamps: the kernels ran 4x slower with the
    same results, which no equality test sees."""
    compiler = kernels._compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    if "clang" in version or "Free Software Foundation" not in version:
        pytest.skip(f"-fopt-info is GCC's; the compiler here is {version.splitlines()[:1]}")
    flags = [f for f in kernels.FLAGS if f != "-shared"]
    for source in kernels.SOURCES:
        marked = {i + 2 for i, line in enumerate(source.read_text().splitlines()) if "#pragma GCC ivdep" in line}
        command = [compiler, *flags, "-I", jax.ffi.include_dir(), "-c", str(source), "-o", str(tmp_path / "k.o")]
        # -all: a loop in a template reports once per instantiation, so one vectorised copy
        # must not hide a scalar one.
        report = subprocess.run([*command, "-fopt-info-vec-all"], capture_output=True, text=True, check=True).stderr
        reported = collections.defaultdict(set)
        for line, what in re.findall(
            rf"{source.name}:(\d+):\d+: (optimized: loop vectorized|missed: couldn't vectorize loop)", report
        ):
            reported[what].add(int(line))
        scalar = (marked & reported["missed: couldn't vectorize loop"]) | (
            marked - reported["optimized: loop vectorized"]
        )
        assert not scalar, f"{source.name}: the loops at lines {sorted(scalar)} stay scalar"


def test_no_compiler_falls_back_and_names_the_cause(tmp_path):
    """A machine without a C++ compiler: 'auto' runs the pure-JAX fallback (logging why once),
    'native' is an error naming what failed."""
    script = """
import logging, jax, jax.numpy as jnp
logging.basicConfig(level=logging.WARNING)
from align_jax import kernels
from align_jax.models import efficientnet as enet
assert not kernels.available()
assert enet.resolve_depthwise_impl("auto", jnp.float32) == "shifted_sum"
x = jnp.ones((1, 6, 6, 4))
layer = enet.DepthwiseConv(3, 1, ((1, 1), (1, 1)))
variables = layer.init(jax.random.key(0), x)
layer.apply(variables, x)
try:
    enet.DepthwiseConv(3, 1, ((1, 1), (1, 1)), impl="native").apply(variables, x)
except kernels.NativeKernelError as e:
    print("ERROR:", e)
"""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-c++"), ALIGN_JAX_KERNEL_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR: compiling align_jax's CPU kernels failed to run" in proc.stdout and "no-such-c++" in proc.stdout
    assert proc.stderr.count("native CPU kernels unavailable") == 1


# ----------------------------------------------------------------------------- batch norm


def _bn_value_and_grads(fn, x, scale, bias, cotangents, group_size, activation):
    out, vjp = jax.vjp(lambda x, s, b: fn(x, s, b, group_size, 1e-3, activation), x, scale, bias)
    return out, vjp(cotangents)


def _bn_inputs(shape, group_size, key=0, mean=0.0):
    keys = jax.random.split(jax.random.key(key), 6)
    x = mean + 2.0 * jax.random.normal(keys[0], shape)
    scale, bias = (jax.random.normal(k, shape[-1:]) for k in keys[1:3])
    groups = shape[0] // group_size
    cotangents = (  # the statistics' cotangents too (they feed the running averages; usually 0)
        jax.random.normal(keys[3], shape),
        jax.random.normal(keys[4], (groups, shape[-1])),
        jax.random.normal(keys[5], (groups, shape[-1])),
    )
    return x, scale, bias, cotangents


@pytest.mark.parametrize(
    "shape,group_size,activation,mean",
    [
        ((4, 5, 6, 7), 4, jax.nn.silu, 0.0),
        ((6, 3, 3, 70), 2, None, 0.0),  # ghost-batch groups of 2, no activation
        ((8, 9, 130), 8, jax.nn.silu, 0.0),  # rank 3, channels past a vector multiple
        ((2, 300, 16), 1, jax.nn.silu, 1000.0),  # far-from-zero mean: the one-pass variance must not cancel
    ],
)
def test_native_batch_norm_equals_the_xla_batch_norm_with_gradients(shape, group_size, activation, mean):
    from align_jax.kernels.batchnorm import native_batch_norm_train
    from align_jax.models.norms import batch_norm_train

    x, scale, bias, cotangents = _bn_inputs(shape, group_size, mean=mean)
    want, want_grads = _bn_value_and_grads(batch_norm_train, x, scale, bias, cotangents, group_size, activation)
    got, got_grads = jax.jit(
        lambda x, s, b: _bn_value_and_grads(native_batch_norm_train, x, s, b, cotangents, group_size, activation)
    )(x, scale, bias)
    for g, w, name in zip(got, want, ("y", "mean", "var"), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * max(1.0, abs(mean)), err_msg=name)
    for g, w, name in zip(got_grads, want_grads, ("dx", "dscale", "dbias"), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()), err_msg=name)


@pytest.mark.parametrize("group_size", [8, 2])
def test_native_batch_norm_sharded_has_global_statistics(group_size):
    """Batch sharded over 8 emulated devices: the statistics span the whole batch (or each group of
    examples) as on one device, and so do the gradients."""
    from align_jax.kernels.batchnorm import native_batch_norm_train

    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    x, scale, bias, cotangents = _bn_inputs((8, 4, 4, 6), group_size, key=3)

    def run(x, s, b, c):
        return _bn_value_and_grads(native_batch_norm_train, x, s, b, c, group_size, jax.nn.silu)

    want, want_grads = jax.jit(run)(x, scale, bias, cotangents)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    replicated = NamedSharding(mesh, P())
    groups = batch if group_size == 1 else replicated
    step = jax.jit(run, in_shardings=(batch, replicated, replicated, (batch, groups, groups)))
    assert "align_jax_batch_norm_apply" in step.lower(x, scale, bias, cotangents).compile().as_text()
    got, got_grads = step(x, scale, bias, cotangents)
    for g, w in zip(got + got_grads, want + want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_batch_norm_module_picks_native_where_it_can():
    from align_jax.models import norms

    assert norms.resolve_impl("auto", jnp.float32, jax.nn.silu) == "native"
    assert norms.resolve_impl("auto", jnp.float32, None) == "native"
    assert norms.resolve_impl("auto", jnp.float32, jax.nn.relu) == "xla"  # no kernel for it
    assert norms.resolve_impl("auto", jnp.bfloat16, jax.nn.silu) == "xla"
    x = jax.random.normal(jax.random.key(4), (4, 3, 3, 5))
    layer = norms.BatchNorm(use_running_average=False, activation=jax.nn.silu)
    variables = layer.init(jax.random.key(5), x)
    outs = {}
    for impl in ("xla", "native", "auto"):
        y, updates = norms.BatchNorm(use_running_average=False, activation=jax.nn.silu, impl=impl).apply(
            variables, x, mutable=["batch_stats"]
        )
        outs[impl] = (y, updates["batch_stats"])
    for impl in ("native", "auto"):
        for got, want in zip(jax.tree.leaves(outs[impl]), jax.tree.leaves(outs["xla"]), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        norms.BatchNorm(use_running_average=False, impl="fast").apply(variables, x, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="float32 input and no activation or SiLU"):
        norms.BatchNorm(use_running_average=False, activation=jax.nn.relu, impl="native").apply(
            variables, x, mutable=["batch_stats"]
        )


def test_efficientnet_training_step_is_the_same_function_with_native_kernels():
    """A small EfficientNet in training mode (batch statistics, drop-connect off): embeddings,
    batch statistics and parameter gradients with the native kernels equal the pure-XLA model's."""
    assert enet.batch_norm_impl("shifted_sum") == "xla" and enet.batch_norm_impl("native") == "native"
    images = jax.random.normal(jax.random.key(6), (4, 48, 48, 3))

    def model(impl):
        return enet.EfficientNet(
            width_coefficient=0.25, depth_coefficient=0.25, drop_connect_rate=0.0, depthwise_impl=impl
        )

    variables = model("conv").init(jax.random.key(7), images)

    def run(impl):
        def loss(params):
            out, updates = model(impl).apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(out * jnp.arange(out.shape[-1])), (out, updates)

        (_, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
        return aux, grads

    want = run("conv")
    # Gradients that are zero in exact arithmetic (e.g. a batch norm's input bias) come out as
    # rounding noise of the whole gradient's scale: compare every gradient at that scale.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want[1]))
    for impl in ("native", "shifted_sum"):
        got = run(impl)
        for g, w in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want[0]), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"{impl} embeddings / batch stats")
        for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{impl} gradients")


# ----------------------------------------------------------------------------- MKL sgemm


needs_mkl = pytest.mark.skipif(not gemm.available(), reason=f"MKL not loadable here: {gemm._state.get('error')}")


def _matmul_value_and_grads(fn, x, w, cotangent):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(jnp.tanh(fn(x, w)), cotangent), (0, 1)))(x, w)


@needs_mkl
@pytest.mark.parametrize("shape", [(96, 40, 24), (7, 1, 5), (300, 130, 3)])
def test_blas_matmul_equals_xla_dot_with_gradients(shape):
    rows, k, n = shape
    rng = np.random.default_rng(rows)
    x, w, cot = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((rows, k), (k, n), (rows, n)))
    got = _matmul_value_and_grads(gemm.blas_matmul, x, w, cot)
    want = _matmul_value_and_grads(lambda x, w: jnp.dot(x, w, precision="highest"), x, w, cot)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@needs_mkl
@pytest.mark.parametrize("x_spec, w_spec", [(P(("data", "fsdp")), P()), (P("data"), P("fsdp")), (P(), P(None, "fsdp"))])
def test_blas_matmul_sharded_equals_one_device(x_spec, w_spec):
    """Rows sharded over the mesh, the kernel fsdp-sharded on either axis: same value and
    gradients as on one device (the kernel gradient is summed over the rows' shards)."""
    mesh = make_mesh([("data", 4), ("fsdp", 2)])
    rng = np.random.default_rng(1)
    x, w, cot = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((64, 48), (48, 40), (64, 40)))
    want = _matmul_value_and_grads(gemm.blas_matmul, x, w, cot)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    got = _matmul_value_and_grads(gemm.blas_matmul, put(x, x_spec), put(w, w_spec), put(cot, x_spec))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("remat", ["none", "dots"])
def test_flat_dense_auto_is_blas_on_cpu_and_equals_xla(remat, capsys):
    """Same parameters, outputs and gradients through MKL and through XLA's dot, also under
    remat='dots' (which keeps the MKL products as it keeps XLA's dots)."""
    assert layers.resolve_matmul_impl("auto", jnp.float32) == "blas"
    assert layers.resolve_matmul_impl("auto", jnp.bfloat16) == "xla"

    def model(impl):
        block = layers.remat_block(_TwoDense, remat, static_argnums=())
        return block(impl=impl)

    x = jax.random.normal(jax.random.key(0), (4, 6, 16))
    params = model("xla").init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, model("auto").init(jax.random.key(1), x))

    def value_and_grads(impl):
        return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(jnp.sin(model(impl).apply(p, x))), (0, 1)))(params, x)

    outs = {impl: value_and_grads(impl) for impl in ("xla", "auto", "blas")}
    for impl in ("auto", "blas"):
        for g, r in zip(jax.tree.leaves(outs[impl]), jax.tree.leaves(outs["xla"]), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    if remat == "dots":
        capsys.readouterr()
        jax.ad_checkpoint.print_saved_residuals(lambda p, x: model("blas").apply(p, x), params, x)
        saved = capsys.readouterr().out
        assert saved.count(f"named '{layers.BLAS_CHECKPOINT_NAME}'") == 1, saved  # the tanh's input


class _TwoDense(nn.Module):
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        y = layers.FlatDense(32, impl=self.impl, name="a")(x)
        return layers.FlatDense(8, impl=self.impl, name="b")(jnp.tanh(y))


@needs_mkl
def test_model_flops_are_counted_with_xla_dots():
    """XLA's cost analysis sees no FLOPs in the MKL call; under `xla_matmuls()` the same model is
    traced with XLA's dot, which is how train_step's `flops_jitted` (MFU) counts them."""
    from align_jax import perf

    dense = layers.FlatDense(64)
    x = jnp.ones((4, 32, 48))
    params = dense.init(jax.random.key(0), x)
    with layers.xla_matmuls():
        assert layers.resolve_matmul_impl("auto", jnp.float32) == "xla"
        counted = perf.step_flops(jax.jit(dense.apply).lower(params, x))
    assert layers.resolve_matmul_impl("auto", jnp.float32) == "blas"
    blas = perf.step_flops(jax.jit(dense.apply).lower(params, x)) or 0.0
    assert counted >= 2 * 128 * 48 * 64 > 10 * blas


def test_blas_path_off_or_missing_names_the_cause(monkeypatch, tmp_path):
    monkeypatch.setattr(gemm, "_state", {})
    monkeypatch.setenv(gemm.BLAS_ENV, "xla")
    assert gemm.blas_path() is None
    with pytest.raises(kernels.NativeKernelError, match="ALIGN_JAX_BLAS=xla"):
        gemm.load()
    assert layers.resolve_matmul_impl("auto", jnp.float32) == "xla"
    monkeypatch.setattr(gemm, "_state", {})
    missing = tmp_path / "libmkl_rt.so.2"
    monkeypatch.setenv(gemm.BLAS_ENV, str(missing))
    with pytest.raises(kernels.NativeKernelError, match=str(missing)):
        gemm.load()
    with pytest.raises(ValueError, match="matmul impl must be one of"):
        layers.resolve_matmul_impl("mkl", jnp.float32)
