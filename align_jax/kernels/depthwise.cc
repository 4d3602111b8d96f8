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
#include <vector>

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

// The taps of one input row (or column) that some output covers: tap i reaches output row
// (ih + pt - i) / stride when that is a whole number in [0, HO). Computed once per row and once
// per column, not per pixel: integer division per tap cost more than the multiply-adds.
struct Taps {
  int64_t count = 0;
  int64_t tap[16];
  int64_t out[16];
};

inline Taps CoveringTaps(int64_t in, int64_t pad, int64_t k, int64_t stride, int64_t out_size) {
  Taps t;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t offset = in + pad - i;
    if (offset < 0 || offset % stride) continue;
    const int64_t o = offset / stride;
    if (o >= out_size) continue;
    t.tap[t.count] = i;
    t.out[t.count++] = o;
  }
  return t;
}

// Channels [c0, c0 + CB) of input-gradient pixel (ih, iw): the outputs whose window covers it.
template <int64_t CB>
inline void InputGradientPixel(const Geometry& g, const float* __restrict dy, const float* __restrict k,
                               float* __restrict dx, int64_t n, int64_t ih, int64_t iw, int64_t c0,
                               const Taps& rows, const Taps& cols) {
  float acc[CB] = {0};
  for (int64_t a = 0; a < rows.count; ++a) {
    const float* dyrow = dy + ((n * g.ho + rows.out[a]) * g.wo) * g.c + c0;
    const float* krow = k + rows.tap[a] * g.kw * g.c + c0;
    for (int64_t b = 0; b < cols.count; ++b) {
      const float* dp = dyrow + cols.out[b] * g.c;
      const float* kp = krow + cols.tap[b] * g.c;
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
                  const Taps* rows, const Taps* cols, int64_t c0) {
    InputGradientPixel<CB>(g, dy, k, dx, n, ih, iw, c0, *rows, *cols);
  }
};

// One output row y[n, oh, :, :].
void ForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t n, int64_t oh) {
  for (int64_t ow = 0; ow < g.wo; ++ow) AllChannels<ForwardOp>(g, x, k, y, n, oh, ow);
}

// One input-gradient row dx[n, ih, :, :].
void InputGradientRow(const Geometry& g, const float* dy, const float* k, float* dx, int64_t n, int64_t ih,
                      const std::vector<Taps>& cols) {
  const Taps rows = CoveringTaps(ih, g.pt, g.kh, g.stride, g.ho);
  for (int64_t iw = 0; iw < g.w; ++iw) AllChannels<InputGradientOp>(g, dy, k, dx, n, ih, iw, &rows, &cols[iw]);
}

// a[0:CB] += sum over `count` outputs of x * dy (x and dy advancing by their strides): the sums
// stay in registers along the row.
template <int64_t CB>
inline void TapSums(float* __restrict a, const float* __restrict x, const float* __restrict dy, int64_t count,
                    int64_t x_step, int64_t dy_step) {
  float acc[CB];
#pragma GCC unroll 64
  for (int64_t c = 0; c < CB; ++c) acc[c] = a[c];
  for (int64_t o = 0; o < count; ++o, x += x_step, dy += dy_step) {
#pragma GCC unroll 64
    for (int64_t c = 0; c < CB; ++c) acc[c] += x[c] * dy[c];
  }
#pragma GCC unroll 64
  for (int64_t c = 0; c < CB; ++c) a[c] = acc[c];
}

// dk[n, :, :, c] = sum over one example's outputs of window * dy, for the channel blocks
// [b0, b1) of kBlock channels. Output rows outermost, so that each input row is read from memory
// once for all the blocks (blocks outermost read it once per block: twice as slow with 96 channels).
void KernelGradientBlocks(const Geometry& g, const float* __restrict x, const float* __restrict dy,
                          float* __restrict dk, int64_t n, int64_t b0, int64_t b1) {
  const int64_t taps = g.kh * g.kw;
  std::unique_ptr<float[]> acc(new float[(b1 - b0) * taps * kBlock]());
  for (int64_t oh = 0; oh < g.ho; ++oh) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * kBlock, cb = std::min(kBlock, g.c - c0);
      const float* dyrow = dy + ((n * g.ho + oh) * g.wo) * g.c + c0;
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.stride + i - g.pt;
        if (ih < 0 || ih >= g.h) continue;
        const float* xrow = x + ((n * g.h + ih) * g.w) * g.c + c0;
        for (int64_t j = 0; j < g.kw; ++j) {
          float* __restrict a = acc.get() + ((blk - b0) * taps + i * g.kw + j) * kBlock;
          // Outputs whose tap (i, j) falls inside the input: ow * s + j - pl in [0, W).
          const int64_t lo = std::max<int64_t>(0, (g.pl - j + g.stride - 1) / g.stride);
          const int64_t hi = std::min<int64_t>(g.wo, (g.w - 1 + g.pl - j) / g.stride + 1);
          const float* xp = xrow + (lo * g.stride + j - g.pl) * g.c;
          const float* dp = dyrow + lo * g.c;
          int64_t c = 0;
          for (; c + 64 <= cb; c += 64) TapSums<64>(a + c, xp + c, dp + c, hi - lo, g.stride * g.c, g.c);
          for (; c + 16 <= cb; c += 16) TapSums<16>(a + c, xp + c, dp + c, hi - lo, g.stride * g.c, g.c);
          for (; c < cb; ++c) TapSums<1>(a + c, xp + c, dp + c, hi - lo, g.stride * g.c, g.c);
        }
      }
    }
  }
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t c0 = blk * kBlock, cb = std::min(kBlock, g.c - c0);
    for (int64_t t = 0; t < taps; ++t) {
      std::memcpy(dk + (n * taps + t) * g.c + c0, acc.get() + ((blk - b0) * taps + t) * kBlock, cb * sizeof(float));
    }
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
  if (g.kh > 16 || g.kw > 16) return ffi::Error::InvalidArgument("depthwise: kernels larger than 16x16");
  std::vector<Taps> cols(g.w);
  for (int64_t iw = 0; iw < g.w; ++iw) cols[iw] = CoveringTaps(iw, g.pl, g.kw, g.stride, g.wo);
  ParallelFor(pool, g.n * g.h, [&](int64_t t) { InputGradientRow(g, dyd, kd, dxd, t / g.h, t % g.h, cols); });
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
  // One task per example, or per group of channel blocks when examples are fewer than ~2 per thread.
  const int64_t blocks = (g.c + kBlock - 1) / kBlock;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t groups = std::min<int64_t>(blocks, (2 * threads + g.n - 1) / g.n);
  ParallelFor(pool, g.n * groups, [&](int64_t t) {
    const int64_t n = t / groups, k = t % groups;
    KernelGradientBlocks(g, xd, dyd, dkd, n, blocks * k / groups, blocks * (k + 1) / groups);
  });
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
