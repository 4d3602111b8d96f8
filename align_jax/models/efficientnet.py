"""EfficientNet image tower, computing exactly what HF's `AlignVisionModel` computes.

Parity details (see HF `modeling_align.py`): explicit padding instead of TF "SAME" (the stem
pads right/bottom by one; stride-2 depthwise convs pad (k//2 - 1, k//2)); the residual is added
only on the repeats of a stage (never on its first block, even when shapes would allow it);
squeeze-excite width is `int(ratio * block input channels)`; no top conv; the embedding is the
global pool of the last stage.

1x1 convolutions are written as `Dense` over the channel axis of the flattened positions
(`FlatDense`): the same maths, but XLA lowers their weight gradients to one matmul instead of a
large-window convolution (much faster on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from align_jax import kernels
from align_jax.kernels.depthwise import native_depthwise
from align_jax.models.layers import FlatDense, remat_block
from align_jax.models.norms import BatchNorm

# (width, depth, native resolution) per variant, from the EfficientNet and Noisy Student papers.
VARIANTS: dict[str, tuple[float, float, int]] = {
    "b0": (1.0, 1.0, 224),
    "b1": (1.0, 1.1, 240),
    "b2": (1.1, 1.2, 260),
    "b3": (1.2, 1.4, 300),
    "b4": (1.4, 1.8, 380),
    "b5": (1.6, 2.2, 456),
    "b6": (1.8, 2.6, 528),
    "b7": (2.0, 3.1, 600),
    "l2": (4.3, 5.3, 800),
}

# The seven MBConv stages of EfficientNet-B0, before width/depth scaling.
BASE_STAGES = dict(
    kernel_sizes=(3, 3, 5, 3, 5, 5, 3),
    in_channels=(32, 16, 24, 40, 80, 112, 192),
    out_channels=(16, 24, 40, 80, 112, 192, 320),
    strides=(1, 2, 2, 2, 1, 2, 1),
    num_block_repeats=(1, 2, 2, 3, 3, 4, 1),
    expand_ratios=(1, 6, 6, 6, 6, 6, 6),
)
STEM_CHANNELS = 32

ACTIVATIONS = {
    "swish": nn.swish,
    "silu": nn.swish,
    "relu": nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
}

conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")


def efficientnet_config(variant: str, **overrides: Any) -> ml_collections.ConfigDict:
    """Every field of the `EfficientNet` module for a named variant ('b0'..'b7', 'l2')."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown EfficientNet variant {variant!r}; expected one of {list(VARIANTS)}")
    width, depth, _ = VARIANTS[variant]
    config = ml_collections.ConfigDict(
        dict(
            width_coefficient=width,
            depth_coefficient=depth,
            depth_divisor=8,
            **BASE_STAGES,
            depthwise_padding=(),
            squeeze_expansion_ratio=0.25,
            activation="swish",
            pooling="mean",
            bn_momentum=0.99,
            bn_epsilon=1e-3,
            drop_connect_rate=0.2,
            drop_connect_mode="per_example",
            bn_group_size=None,
            depthwise_impl="auto",
            remat="none",
        )
    )
    config.update(overrides)
    return config


def round_filters(channels: int, width: float, divisor: int) -> int:
    """Scales a channel count by `width`, rounded to a multiple of `divisor` (HF/TF rule)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    in_dim: int
    out_dim: int
    stride: int
    kernel_size: int
    expand_ratio: int
    residual: bool
    adjust_padding: bool
    drop_rate: float


def block_specs(
    width_coefficient: float,
    depth_coefficient: float,
    depth_divisor: int,
    kernel_sizes: Sequence[int],
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    strides: Sequence[int],
    num_block_repeats: Sequence[int],
    expand_ratios: Sequence[int],
    depthwise_padding: Sequence[int] = (),
    drop_connect_rate: float = 0.2,
) -> tuple[BlockSpec, ...]:
    """The flat list of MBConv blocks, enumerated as HF's `AlignVisionEncoder` does."""
    lengths = {len(x) for x in (kernel_sizes, in_channels, out_channels, strides, num_block_repeats, expand_ratios)}
    if len(lengths) != 1:
        raise ValueError("EfficientNet stage lists (kernel_sizes, in_channels, ...) differ in length")
    num_blocks = sum(round_repeats(n, depth_coefficient) for n in num_block_repeats)
    specs = []
    for i, repeats in enumerate(num_block_repeats):
        in_dim = round_filters(in_channels[i], width_coefficient, depth_divisor)
        out_dim = round_filters(out_channels[i], width_coefficient, depth_divisor)
        for j in range(round_repeats(repeats, depth_coefficient)):
            index = len(specs)
            specs.append(
                BlockSpec(
                    in_dim=in_dim if j == 0 else out_dim,
                    out_dim=out_dim,
                    stride=strides[i] if j == 0 else 1,
                    kernel_size=kernel_sizes[i],
                    expand_ratio=expand_ratios[i],
                    residual=j > 0,
                    adjust_padding=index not in depthwise_padding,
                    drop_rate=drop_connect_rate * index / num_blocks,
                )
            )
    return tuple(specs)


def depthwise_padding(kernel_size: int, stride: int, adjust: bool) -> tuple[tuple[int, int], ...]:
    """HF's explicit padding: stride 2 pads (k//2 - 1, k//2) (or symmetric when not adjusted)."""
    half = kernel_size // 2
    if stride == 1:
        pad = (half, half)
    elif adjust:
        pad = (half - 1, half)
    else:
        pad = (half, half)
    return (pad, pad)


DEPTHWISE_IMPLS = ("auto", "conv", "shifted_sum", "native")


def _shifted_windows(xp: jax.Array, k_h: int, k_w: int, stride: int, out_h: int, out_w: int):
    """(i, j, xp[:, i::stride, j::stride][:out_h, :out_w]) for every kernel tap."""
    n, _, _, c = xp.shape
    for i in range(k_h):
        for j in range(k_w):
            limit = (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c)
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), limit, (1, stride, stride, 1))


def _shifted_sum(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], ...]) -> jax.Array:
    k_h, k_w = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    if any(p for pair in padding for p in pair):
        # A materialised padded copy (one pass) keeps the pad out of the k*k-term loop below, whose
        # bounds checks would otherwise stop XLA:CPU from vectorising it (2x on the forward).
        xp = jax.lax.optimization_barrier(xp)
    out_h = (xp.shape[1] - k_h) // stride + 1
    out_w = (xp.shape[2] - k_w) // stride + 1
    out = None
    for i, j, window in _shifted_windows(xp, k_h, k_w, stride, out_h, out_w):
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_sum_depthwise(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[tuple[int, int], ...]
) -> jax.Array:
    """Depthwise convolution as a sum of k*k strided shifted slices times per-channel weights:
    the same result as a grouped convolution, but XLA's CPU backend fuses it into a few loops
    where its grouped-convolution lowering is 10x slower forward and 3-8x with gradients
    (benchmarks/RESULTS.md). The custom VJP keeps only `x` for the backward pass: autodiff of the
    sum would store all k*k shifted windows (k*k copies of the activation per layer)."""
    return _shifted_sum(x, kernel, stride, padding)


def _shifted_sum_fwd(x, kernel, stride, padding):
    return _shifted_sum(x, kernel, stride, padding), (x, kernel)


def _input_gradient(g, kernel, x_shape, stride, padding):
    """The cotangent dilated by the stride, padded by k - 1 less the forward padding (negative
    padding crops) and correlated with the flipped kernel."""
    k_h, k_w = kernel.shape[:2]
    (low_h, high_h), (low_w, high_w) = padding
    out_h, out_w = g.shape[1:3]
    # Rows (columns) of the padded input that no window reached when (padded - k) % stride != 0.
    unread_h = x_shape[1] + low_h + high_h - (stride * (out_h - 1) + 1) - (k_h - 1)
    unread_w = x_shape[2] + low_w + high_w - (stride * (out_w - 1) + 1) - (k_w - 1)
    g_dilated = jax.lax.pad(
        g,
        jnp.zeros((), g.dtype),
        (
            (0, 0, 0),
            (k_h - 1 - low_h, k_h - 1 + unread_h - high_h, stride - 1),
            (k_w - 1 - low_w, k_w - 1 + unread_w - high_w, stride - 1),
            (0, 0, 0),
        ),
    )
    return _shifted_sum(g_dilated, kernel[::-1, ::-1], 1, ((0, 0), (0, 0)))


def _shifted_sum_bwd(stride, padding, residuals, g):
    """Both gradients one example at a time (a scan over the batch): d/dkernel is one reduction per
    tap of a shifted window of the input times the cotangent, and XLA:CPU materialises each window
    before reducing it; one example's windows stay in cache where the whole batch's went to memory
    (2-3x faster per layer; benchmarks/RESULTS.md). d/dx: see `_input_gradient`."""
    x, kernel = residuals
    k_h, k_w = kernel.shape[:2]
    out_h, out_w = g.shape[1:3]

    def one_example(d_kernel, example):
        xi, gi = example  # [H, W, C], [out_h, out_w, C]
        xp = jnp.pad(xi[None], ((0, 0), padding[0], padding[1], (0, 0)))
        taps = [
            jnp.sum(window[0] * gi, axis=(0, 1), dtype=jnp.float32)
            for _, _, window in _shifted_windows(xp, k_h, k_w, stride, out_h, out_w)
        ]
        dxi = _input_gradient(gi[None], kernel, (1,) + xi.shape, stride, padding)[0]
        return d_kernel + jnp.stack(taps), dxi

    d_kernel = jnp.zeros((k_h * k_w, x.shape[-1]), jnp.float32)
    d_kernel, dx = jax.lax.scan(one_example, d_kernel, (x, g))
    return dx, d_kernel.reshape(kernel.shape).astype(kernel.dtype)


shifted_sum_depthwise.defvjp(_shifted_sum_fwd, _shifted_sum_bwd)


def resolve_depthwise_impl(impl: str, dtype: Any) -> str:
    """What `DepthwiseConv(impl=...)` runs: 'auto' picks by backend, dtype and whether the native
    kernels can be built here (`align_jax.kernels.available`, which logs why not)."""
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "conv"
    if jnp.dtype(dtype) == jnp.float32 and kernels.available():
        return "native"
    return "shifted_sum"


def batch_norm_impl(depthwise_impl: str) -> str:
    """The batch norms follow the depthwise choice: native kernels with 'native' (or 'auto', where
    they build), XLA's with the pure-XLA lowerings ('shifted_sum', 'conv')."""
    return depthwise_impl if depthwise_impl in ("auto", "native") else "xla"


class DepthwiseConv(nn.Module):
    """A depthwise convolution with `nn.Conv`'s parameter layout (`kernel [k, k, 1, C]`), so
    checkpoints and the HF importer are the same whichever implementation runs."""

    kernel_size: int
    stride: int
    padding: tuple[tuple[int, int], ...]
    # 'conv' (XLA's grouped convolution), 'shifted_sum' (pure JAX, for XLA:CPU), 'native' (C++ CPU
    # kernels, align_jax.kernels) or 'auto': on CPU native in float32 when it builds, else
    # shifted_sum; conv on accelerators.
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {self.impl!r}")
        channels = x.shape[-1]
        kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        impl = resolve_depthwise_impl(self.impl, x.dtype)
        if impl == "native":
            if x.dtype != jnp.float32:
                raise ValueError(f"depthwise_impl='native' computes in float32, got {x.dtype}")
            kernels.load()  # raises NativeKernelError naming why it cannot be built
            return native_depthwise(x, kernel[:, :, 0], self.stride, self.padding)
        if impl == "shifted_sum":
            return shifted_sum_depthwise(x, kernel, self.stride, self.padding)
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels,
        )


class StemConv(nn.Module):
    """The stem's dense 3x3 stride-2 convolution with `nn.Conv`'s parameter layout. On CPU
    (`impl` 'auto' or 'shifted_sum') it is one matmul over the k*k*C_in patches (im2col): the
    forward costs the same as XLA's convolution, the weight gradient a third (benchmarks/RESULTS.md)."""

    features: int
    kernel_size: int
    stride: int
    padding: tuple[tuple[int, int], ...]
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, in_features = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", conv_init, (k, k, in_features, self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.impl == "conv" or (self.impl == "auto" and jax.default_backend() != "cpu"):
            return jax.lax.conv_general_dilated(
                x, kernel, (self.stride, self.stride), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        xp = jnp.pad(x, ((0, 0), self.padding[0], self.padding[1], (0, 0)))
        out_h = (xp.shape[1] - k) // self.stride + 1
        out_w = (xp.shape[2] - k) // self.stride + 1
        # Patch features in the kernel's (row, column, channel) order.
        patches = jnp.concatenate([w for _, _, w in _shifted_windows(xp, k, k, self.stride, out_h, out_w)], axis=-1)
        out = patches.reshape(-1, k * k * in_features) @ kernel.reshape(k * k * in_features, self.features)
        return out.reshape(x.shape[0], out_h, out_w, self.features)


class GatedProjection(nn.Module):
    """The block's 1x1 projection of `x * gate` (`gate [N, C]`: squeeze-excite, one value per
    example and channel), with `FlatDense`'s parameter (`kernel [C, features]`). With `fold`, the
    gate scales each example's copy of the kernel instead of x: `x[n] @ (gate[n, :, None] *
    kernel)`, the same maths without the activation-sized product and, backward, without the
    activation-sized reduction for the gate's gradient. On CPU that halves the projection's time
    where positions outnumber channels twice over (the first blocks) and loses where they do not
    (benchmarks/RESULTS.md, session 8)."""

    features: int
    fold: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        kernel = self.param("kernel", conv_init, (c, self.features), jnp.float32)
        x, gate, kernel = nn.dtypes.promote_dtype(x, gate, kernel, dtype=self.dtype)
        if self.fold and h * w >= 2 * c:
            y = jnp.einsum("nrc,nco->nro", x.reshape(n, h * w, c), gate[:, :, None] * kernel)
        else:
            y = (x * gate[:, None, None, :]).reshape(-1, c) @ kernel
        return y.reshape(n, h, w, self.features)


class DropConnect(nn.Module):
    """Residual-branch dropout: whole examples ('per_example', stochastic depth as in the
    original EfficientNet) or single elements ('elementwise', as HF's port does)."""

    rate: float
    mode: str = "per_example"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.mode == "per_example" else x.shape
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, shape)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class MBConvBlock(nn.Module):
    spec: BlockSpec
    squeeze_expansion_ratio: float
    activation: str
    bn_momentum: float
    bn_epsilon: float
    bn_group_size: int | None
    drop_connect_mode: str
    depthwise_impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        act = ACTIVATIONS[self.activation]
        norm = functools.partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            group_size=self.bn_group_size,
            dtype=self.dtype,
            impl=batch_norm_impl(self.depthwise_impl),
        )
        dense = functools.partial(FlatDense, dtype=self.dtype, kernel_init=conv_init)
        inputs = x
        width = spec.in_dim
        if spec.expand_ratio != 1:
            width = spec.in_dim * spec.expand_ratio
            x = dense(width, use_bias=False, name="expand_conv")(x)
            x = norm(name="expand_bn", activation=act)(x)
        x = DepthwiseConv(
            spec.kernel_size,
            spec.stride,
            depthwise_padding(spec.kernel_size, spec.stride, spec.adjust_padding),
            self.depthwise_impl,
            self.dtype,
            name="depthwise_conv",
        )(x)
        x = norm(name="depthwise_bn", activation=act)(x)
        # Squeeze-excite; its bottleneck is sized from the block *input* width.
        se_width = max(1, int(spec.in_dim * self.squeeze_expansion_ratio))
        s = jnp.mean(x, axis=(1, 2))
        s = act(dense(se_width, name="se_reduce")(s))
        s = nn.sigmoid(dense(width, name="se_expand")(s))
        fold = resolve_depthwise_impl(self.depthwise_impl, self.dtype) != "conv"  # CPU
        x = GatedProjection(spec.out_dim, fold, self.dtype, name="project_conv")(x, s)
        x = norm(name="project_bn")(x)
        if spec.residual:
            x = DropConnect(spec.drop_rate, self.drop_connect_mode)(x, deterministic=not train)
            x = x + inputs
        return x


class EfficientNet(nn.Module):
    """EfficientNet backbone returning the pooled last stage `[N, C]` (ALIGN's image embedding)."""

    width_coefficient: float
    depth_coefficient: float
    depth_divisor: int = 8
    kernel_sizes: Sequence[int] = BASE_STAGES["kernel_sizes"]
    in_channels: Sequence[int] = BASE_STAGES["in_channels"]
    out_channels: Sequence[int] = BASE_STAGES["out_channels"]
    strides: Sequence[int] = BASE_STAGES["strides"]
    num_block_repeats: Sequence[int] = BASE_STAGES["num_block_repeats"]
    expand_ratios: Sequence[int] = BASE_STAGES["expand_ratios"]
    depthwise_padding: Sequence[int] = ()
    squeeze_expansion_ratio: float = 0.25
    activation: str = "swish"
    pooling: str = "mean"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    drop_connect_rate: float = 0.2
    drop_connect_mode: str = "per_example"
    bn_group_size: int | None = None  # None: statistics over the whole batch; else per group
    # See DepthwiseConv; also picks the stem's lowering (StemConv) and the batch norms' (batch_norm_impl).
    depthwise_impl: str = "auto"
    remat: str = "none"  # MBConv blocks: 'none', 'full' or 'dots' (see align_jax.models.vit)
    dtype: Any = jnp.float32

    def blocks(self) -> tuple[BlockSpec, ...]:
        return block_specs(
            self.width_coefficient,
            self.depth_coefficient,
            self.depth_divisor,
            self.kernel_sizes,
            self.in_channels,
            self.out_channels,
            self.strides,
            self.num_block_repeats,
            self.expand_ratios,
            self.depthwise_padding,
            self.drop_connect_rate,
        )

    @property
    def features(self) -> int:
        """Width of the pooled output."""
        return self.blocks()[-1].out_dim

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        chex.assert_rank(images, 4)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {list(ACTIVATIONS)}")
        if self.pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {self.pooling!r}")
        if self.drop_connect_mode not in ("per_example", "elementwise"):
            raise ValueError(
                f"drop_connect_mode must be 'per_example' or 'elementwise', got {self.drop_connect_mode!r}"
            )
        act = ACTIVATIONS[self.activation]
        x = images.astype(self.dtype)
        x = StemConv(
            round_filters(STEM_CHANNELS, self.width_coefficient, self.depth_divisor),
            3,
            2,
            ((0, 1), (0, 1)),  # HF: ZeroPad2d((0, 1, 0, 1)) then a 'valid' conv
            self.depthwise_impl,
            self.dtype,
            name="stem_conv",
        )(x)
        x = BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            group_size=self.bn_group_size,
            dtype=self.dtype,
            activation=act,
            impl=batch_norm_impl(self.depthwise_impl),
            name="stem_bn",
        )(x)
        block = remat_block(MBConvBlock, self.remat, static_argnums=(2,))  # (self, x, train)
        for i, spec in enumerate(self.blocks()):
            x = block(
                spec,
                self.squeeze_expansion_ratio,
                self.activation,
                self.bn_momentum,
                self.bn_epsilon,
                self.bn_group_size,
                self.drop_connect_mode,
                self.depthwise_impl,
                self.dtype,
                name=f"block_{i}",
            )(x, train)
        pool = jnp.mean if self.pooling == "mean" else jnp.max
        return pool(x, axis=(1, 2))
