"""What the repeated-layer towers share: the pre-LN Transformer encoder (the ViT image tower and
the CLIP-style text tower; big_vision's text tower reuses its ViT encoder the same way),
rematerialisation and the scan over layers.

Rematerialisation (`remat`, per tower): the activations of a repeated block (ViT/Transformer
layer, BERT layer, EfficientNet MBConv block) are recomputed in the backward pass instead of
kept from the forward one:

- `"none"`: keep everything (fastest, most memory);
- `"full"`: keep only each block's input, recompute the rest (`nn.remat`, no policy);
- `"dots"`: also keep the outputs of matmuls without batch dimensions (Dense / 1x1 conv
  projections), recompute the rest: `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`.
  Attention scores (a batched einsum, `[N, heads, L, L]`) are recomputed, which is where the
  memory goes at long sequences; `checkpoint_dots` would keep them too.

Either way the parameter tree is the same as without remat, so checkpoints do not depend on it.

Scanning (`scan_layers`, Transformer towers): the layers run as one `nn.scan` over a stacked
copy of their parameters, so XLA compiles one layer instead of `num_layers`. The parameters then
live under `layers` with a leading layer axis instead of under `layer_0 .. layer_{n-1}`;
`stack_layers` / `unstack_layers` convert between the two (checkpoints and the HF importer use
the unscanned layout).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

MATMUL_IMPLS = ("auto", "xla", "blas")
# What `FlatDense` names its MKL products, so that remat="dots" keeps them as it keeps XLA's dots.
BLAS_CHECKPOINT_NAME = "blas_matmul"


_XLA_MATMULS = contextvars.ContextVar("align_jax_xla_matmuls", default=False)


@contextlib.contextmanager
def xla_matmuls():
    """Models traced inside use XLA's dot for every 'auto' `FlatDense`: XLA's cost analysis counts
    no FLOPs in an FFI call, so model FLOPs (MFU) are read from such a trace."""
    token = _XLA_MATMULS.set(True)
    try:
        yield
    finally:
        _XLA_MATMULS.reset(token)


def resolve_matmul_impl(impl: str, dtype: Any) -> str:
    """What `FlatDense(impl=...)` runs: 'auto' is MKL's sgemm (`align_jax.kernels.gemm`) for float32
    on CPU where it loads (outside `xla_matmuls()`), else XLA's dot."""
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul impl must be one of {MATMUL_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if _XLA_MATMULS.get():
        return "xla"
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32:
        from align_jax.kernels import gemm

        if gemm.available():
            return "blas"
    return "xla"


class FlatDense(nn.Dense):
    """`nn.Dense` (same parameters) applied to the input flattened to `[rows, features]`. The
    weight gradient of a Dense over `[N, L, D]` contracts two axes, and XLA:CPU then runs it
    outside its matmul library after writing the output gradient transposed; with one contracting
    axis it is one library matmul (benchmarks/RESULTS.md). On CPU in float32 the product goes to
    MKL's sgemm where it is installed (`impl`, `resolve_matmul_impl`): faster than XLA:CPU's
    matmuls on the CPUs measured. Other backends see the same maths."""

    impl: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        flat = inputs.reshape(-1, inputs.shape[-1])
        dtype = self.dtype or jnp.result_type(inputs.dtype, self.param_dtype)
        custom_dot = self.dot_general is not None or self.dot_general_cls is not None
        if not custom_dot and resolve_matmul_impl(self.impl, dtype) == "blas":
            y = self._blas(flat, dtype)
        else:
            y = super().__call__(flat)
        return y.reshape(*inputs.shape[:-1], self.features)

    def _blas(self, flat: jax.Array, dtype: Any) -> jax.Array:
        from align_jax.kernels import gemm

        if jnp.dtype(dtype) != jnp.float32:
            raise ValueError(f"FlatDense impl='blas' computes in float32, got {jnp.dtype(dtype)}")
        gemm.load()  # raises NativeKernelError naming why it cannot be had
        kernel = self.param("kernel", self.kernel_init, (flat.shape[-1], self.features), self.param_dtype)
        y = gemm.blas_matmul(flat.astype(jnp.float32), kernel.astype(jnp.float32))
        y = checkpoint_name(y, BLAS_CHECKPOINT_NAME)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(jnp.float32)
        return y


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # PyTorch's nn.GELU, open_clip, timm
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),  # big_vision's nn.gelu default
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": nn.relu,
}

REMAT_MODES = ("none", "full", "dots")

# big_vision's initialisers: Xavier-uniform kernels, near-zero MLP biases.
xavier = nn.initializers.xavier_uniform()
mlp_bias_init = nn.initializers.normal(1e-6)


def remat_block(
    block: type[nn.Module], remat: str, static_argnums: tuple[int, ...], prevent_cse: bool = True
) -> type[nn.Module]:
    """`block`, rematerialised as `remat` says (see the module docstring). The `train` flag must
    be among `static_argnums` (counting `self` as 0) and be passed positionally: Python control
    flow depends on it. Under `nn.scan`, pass `prevent_cse=False` (scan already prevents CSE)."""
    if remat not in REMAT_MODES:
        raise ValueError(f"remat must be one of {REMAT_MODES}, got {remat!r}")
    if remat == "none":
        return block
    policy = None
    if remat == "dots":  # XLA's dots and FlatDense's MKL products alike
        policy = jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(BLAS_CHECKPOINT_NAME),
        )
    return nn.remat(block, policy=policy, static_argnums=static_argnums, prevent_cse=prevent_cse)


def repeat_layers(
    layer: type[nn.Module],
    layer_fields: Mapping[str, Any],
    num_layers: int,
    x: jax.Array,
    *broadcast: Any,
    train: bool,
    remat: str = "none",
    scan: bool = False,
) -> jax.Array:
    """Runs `num_layers` copies of `layer(**layer_fields)` as `x = layer(x, *broadcast, train)`,
    named `layer_{i}`, or scanned as one `layers` module with stacked parameters. Call it from
    the parent's compact method (the layers become its children)."""
    block = remat_block(layer, remat, static_argnums=(len(broadcast) + 2,), prevent_cse=not scan)
    if not scan:
        for i in range(num_layers):
            x = block(**layer_fields, name=f"layer_{i}")(x, *broadcast, train)
        return x
    scanned = nn.scan(
        lambda module, carry, *args: (module(carry, *args, train), None),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(broadcast),
        length=num_layers,
    )
    x, _ = scanned(block(**layer_fields, name="layers"), x, *broadcast)
    return x


def stack_layers(tree: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """`layer_0 .. layer_{n-1}` subtrees -> one `layers` subtree with a leading layer axis: the
    `scan_layers=True` layout of the module whose parameters (or optimizer state) `tree` is."""
    names = [f"layer_{i}" for i in range(num_layers)]
    missing = [n for n in names if n not in tree]
    if missing:
        raise KeyError(f"stack_layers: no {missing} in {sorted(tree)}")
    out = {k: v for k, v in tree.items() if k not in names}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[n] for n in names))
    return out


def unstack_layers(tree: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The inverse of `stack_layers`: a stacked `layers` subtree -> `layer_0 .. layer_{n-1}`."""
    if "layers" not in tree:
        raise KeyError(f"unstack_layers: no 'layers' in {sorted(tree)}")
    out = {k: v for k, v in tree.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], tree["layers"])
    return out


def check_heads(hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of num_heads {num_heads}")


class EncoderBlock(nn.Module):
    """Pre-LN Transformer layer: x + Attention(LN(x)), then x + MLP(LN(x))."""

    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    dropout: float
    activation: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        hidden = x.shape[-1]
        norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
        drop = functools.partial(nn.Dropout, self.dropout, deterministic=not train)
        y = norm(name="attention_ln")(x)
        y = nn.MultiHeadDotProductAttention(
            self.num_heads,
            dtype=self.dtype,
            kernel_init=xavier,
            force_fp32_for_softmax=True,
            name="attention",
        )(y, mask=mask, deterministic=not train)
        x = x + drop()(y)
        y = norm(name="mlp_ln")(x)
        dense = functools.partial(FlatDense, dtype=self.dtype, kernel_init=xavier, bias_init=mlp_bias_init)
        y = ACTIVATIONS[self.activation](dense(self.intermediate_size, name="mlp_in")(y))
        y = dense(hidden, name="mlp_out")(y)
        return x + drop()(y)


class Encoder(nn.Module):
    """`num_layers` pre-LN layers and the final LayerNorm; `mask` (broadcastable to
    `[N, heads, L, L]`, True = attend) or None."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    activation: str = "gelu"
    remat: str = "none"
    scan_layers: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> jax.Array:
        chex.assert_rank(x, 3)
        check_heads(x.shape[-1], self.num_heads)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {list(ACTIVATIONS)}")
        fields = dict(
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            activation=self.activation,
            dtype=self.dtype,
        )
        x = repeat_layers(
            EncoderBlock, fields, self.num_layers, x, mask, train=train, remat=self.remat, scan=self.scan_layers
        )
        return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_ln")(x)
