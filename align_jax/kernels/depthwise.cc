// Depthwise 2-D convolution on CPU, NHWC float32, as three XLA FFI handlers: the forward pass, the
// input gradient and the per-example kernel gradient. XLA:CPU lowers a grouped convolution (and its
// gradients) to slow generic loops, and the pure-JAX shifted-sum fallback
// (align_jax.models.efficientnet.shifted_sum_depthwise) streams k*k window copies through memory
// for the kernel gradient; these loops touch each input row once per output row, in cache, and
// vectorise over channels. Work is split over output rows (or examples) on XLA's intra-op pool.
//
// Shapes: x [N, H, W, C], kernel [KH, KW, C], y [N, HO, WO, C] with
// y[n, oh, ow, c] = sum_{i, j} x[n, oh * s + i - pt, ow * s + j - pl, c] * kernel[i, j, c]
// (x is zero outside [0, H) x [0, W)). Built at first use by align_jax/kernels/__init__.py.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using align_jax::ParallelFor;

namespace {

constexpr int64_t kBlock = 64;  // channels per register block (4 AVX-512 vectors)

struct Geometry {
  int64_t n, h, w, c, kh, kw, ho, wo, stride, pt, pl;
};

// Channels [c0, c0 + CB) of output pixel (oh, ow): CB is a compile-time block so the sums stay in
// vector registers across the k*k taps.
template <int64_t CB>
inline void ForwardPixel(const Geometry& g, const float* __restrict x, const float* __restrict k,
                         float* __restrict y, int64_t n, int64_t oh, int64_t ow, int64_t c0) {
  float acc[CB] = {0};
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride + i - g.pt;
    if (ih < 0 || ih >= g.h) continue;
    const float* xrow = x + ((n * g.h + ih) * g.w) * g.c + c0;
    const float* krow = k + i * g.kw * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = ow * g.stride + j - g.pl;
      if (iw < 0 || iw >= g.w) continue;
      const float* xp = xrow + iw * g.c;
      const float* kp = krow + j * g.c;
#pragma GCC unroll 64
      for (int64_t c = 0; c < CB; ++c) acc[c] += xp[c] * kp[c];
    }
  }
  float* out = y + (((n * g.ho + oh) * g.wo) + ow) * g.c + c0;
#pragma GCC unroll 64
  for (int64_t c = 0; c < CB; ++c) out[c] = acc[c];
}

// Channels [c0, c0 + CB) of input-gradient pixel (ih, iw): the outputs whose window covers it.
template <int64_t CB>
inline void InputGradientPixel(const Geometry& g, const float* __restrict dy, const float* __restrict k,
                               float* __restrict dx, int64_t n, int64_t ih, int64_t iw, int64_t c0) {
  float acc[CB] = {0};
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t th = ih + g.pt - i;
    if (th < 0 || th % g.stride) continue;
    const int64_t oh = th / g.stride;
    if (oh >= g.ho) continue;
    const float* dyrow = dy + ((n * g.ho + oh) * g.wo) * g.c + c0;
    const float* krow = k + i * g.kw * g.c + c0;
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t tw = iw + g.pl - j;
      if (tw < 0 || tw % g.stride) continue;
      const int64_t ow = tw / g.stride;
      if (ow >= g.wo) continue;
      const float* dp = dyrow + ow * g.c;
      const float* kp = krow + j * g.c;
#pragma GCC unroll 64
      for (int64_t c = 0; c < CB; ++c) acc[c] += dp[c] * kp[c];
    }
  }
  float* out = dx + (((n * g.h + ih) * g.w) + iw) * g.c + c0;
#pragma GCC unroll 64
  for (int64_t c = 0; c < CB; ++c) out[c] = acc[c];
}

// Every channel of one pixel, in register blocks of 64, then 16, then 1 channels.
template <template <int64_t> class Pixel, typename... Args>
inline void AllChannels(const Geometry& g, Args... args) {
  int64_t c0 = 0;
  for (; c0 + 64 <= g.c; c0 += 64) Pixel<64>::Run(g, args..., c0);
  for (; c0 + 16 <= g.c; c0 += 16) Pixel<16>::Run(g, args..., c0);
  for (; c0 < g.c; ++c0) Pixel<1>::Run(g, args..., c0);
}

template <int64_t CB>
struct ForwardOp {
  static void Run(const Geometry& g, const float* x, const float* k, float* y, int64_t n, int64_t oh, int64_t ow,
                  int64_t c0) {
    ForwardPixel<CB>(g, x, k, y, n, oh, ow, c0);
  }
};

template <int64_t CB>
struct InputGradientOp {
  static void Run(const Geometry& g, const float* dy, const float* k, float* dx, int64_t n, int64_t ih, int64_t iw,
                  int64_t c0) {
    InputGradientPixel<CB>(g, dy, k, dx, n, ih, iw, c0);
  }
};

// One output row y[n, oh, :, :].
void ForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t n, int64_t oh) {
  for (int64_t ow = 0; ow < g.wo; ++ow) AllChannels<ForwardOp>(g, x, k, y, n, oh, ow);
}

// One input-gradient row dx[n, ih, :, :].
void InputGradientRow(const Geometry& g, const float* dy, const float* k, float* dx, int64_t n, int64_t ih) {
  for (int64_t iw = 0; iw < g.w; ++iw) AllChannels<InputGradientOp>(g, dy, k, dx, n, ih, iw);
}

// dk[n, :, :, c0:c0+cb] = sum over one example's outputs of window * dy, for one channel block.
void KernelGradientBlock(const Geometry& g, const float* __restrict x, const float* __restrict dy,
                         float* __restrict dk, int64_t n, int64_t c0) {
  const int64_t cb = std::min(kBlock, g.c - c0);
  const int64_t taps = g.kh * g.kw;
  std::unique_ptr<float[]> acc(new float[taps * kBlock]());
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    const float* dyrow = dy + ((n * g.ho + oh) * g.wo) * g.c + c0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.stride + i - g.pt;
      if (ih < 0 || ih >= g.h) continue;
      const float* xrow = x + ((n * g.h + ih) * g.w) * g.c + c0;
      for (int64_t j = 0; j < g.kw; ++j) {
        float* __restrict a = acc.get() + (i * g.kw + j) * kBlock;
        // Outputs whose tap (i, j) falls inside the input: ow * s + j - pl in [0, W).
        const int64_t lo = std::max<int64_t>(0, (g.pl - j + g.stride - 1) / g.stride);
        const int64_t hi = std::min<int64_t>(g.wo, (g.w - 1 + g.pl - j) / g.stride + 1);
        for (int64_t ow = lo; ow < hi; ++ow) {
          const float* xp = xrow + (ow * g.stride + j - g.pl) * g.c;
          const float* dp = dyrow + ow * g.c;
#pragma GCC ivdep
          for (int64_t c = 0; c < cb; ++c) a[c] += xp[c] * dp[c];
        }
      }
    }
  }
  for (int64_t t = 0; t < taps; ++t) {
    std::memcpy(dk + (n * taps + t) * g.c + c0, acc.get() + t * kBlock, cb * sizeof(float));
  }
}

ffi::Error MakeGeometry(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> k_dims,
                        ffi::Span<const int64_t> y_dims, int64_t stride, int64_t pt, int64_t pl, Geometry* g) {
  if (x_dims.size() != 4 || k_dims.size() != 3 || y_dims.size() != 4) {
    return ffi::Error::InvalidArgument("depthwise: expected x [N,H,W,C], kernel [KH,KW,C], y [N,HO,WO,C]");
  }
  *g = Geometry{x_dims[0], x_dims[1], x_dims[2], x_dims[3], k_dims[0], k_dims[1], y_dims[1], y_dims[2],
                stride,    pt,        pl};
  if (k_dims[2] != g->c || y_dims[0] != g->n || y_dims[3] != g->c || stride < 1) {
    return ffi::Error::InvalidArgument("depthwise: inconsistent shapes or stride " + std::to_string(stride));
  }
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  ffi::Error error = MakeGeometry(x.dimensions(), k.dimensions(), y->dimensions(), stride, pad_top, pad_left, &g);
  if (error.failure()) return error;
  const float* xd = x.typed_data();
  const float* kd = k.typed_data();
  float* yd = y->typed_data();
  ParallelFor(pool, g.n * g.ho, [&](int64_t t) { ForwardRow(g, xd, kd, yd, t / g.ho, t % g.ho); });
  return ffi::Error::Success();
}

ffi::Error InputGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> k,
                             ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t pad_top, int64_t pad_left) {
  Geometry g;
  ffi::Error error = MakeGeometry(dx->dimensions(), k.dimensions(), dy.dimensions(), stride, pad_top, pad_left, &g);
  if (error.failure()) return error;
  const float* dyd = dy.typed_data();
  const float* kd = k.typed_data();
  float* dxd = dx->typed_data();
  ParallelFor(pool, g.n * g.h, [&](int64_t t) { InputGradientRow(g, dyd, kd, dxd, t / g.h, t % g.h); });
  return ffi::Error::Success();
}

ffi::Error KernelGradientImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                              ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t pad_top, int64_t pad_left) {
  auto dk_dims = dk->dimensions();  // [N, KH, KW, C]
  if (dk_dims.size() != 4) return ffi::Error::InvalidArgument("depthwise: expected dk [N,KH,KW,C]");
  const int64_t k_dims[3] = {dk_dims[1], dk_dims[2], dk_dims[3]};
  Geometry g;
  ffi::Error error =
      MakeGeometry(x.dimensions(), ffi::Span<const int64_t>(k_dims, 3), dy.dimensions(), stride, pad_top, pad_left, &g);
  if (error.failure()) return error;
  const float* xd = x.typed_data();
  const float* dyd = dy.typed_data();
  float* dkd = dk->typed_data();
  const int64_t blocks = (g.c + kBlock - 1) / kBlock;
  ParallelFor(pool, g.n * blocks,
              [&](int64_t t) { KernelGradientBlock(g, xd, dyd, dkd, t / blocks, (t % blocks) * kBlock); });
  return ffi::Error::Success();
}

}  // namespace

#define ALIGN_JAX_BINDING                         \
  ffi::Ffi::Bind()                                \
      .Ctx<ffi::ThreadPool>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()               \
      .Arg<ffi::Buffer<ffi::F32>>()               \
      .Ret<ffi::Buffer<ffi::F32>>()               \
      .Attr<int64_t>("stride")                    \
      .Attr<int64_t>("pad_top")                   \
      .Attr<int64_t>("pad_left")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxDepthwiseForward, ForwardImpl, ALIGN_JAX_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxDepthwiseInputGradient, InputGradientImpl, ALIGN_JAX_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxDepthwiseKernelGradient, KernelGradientImpl, ALIGN_JAX_BINDING);
