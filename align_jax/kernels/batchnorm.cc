// Training-mode batch norm (+ SiLU) on CPU as four per-example XLA FFI handlers, float32, x viewed
// as [N, R, C] (R = positions per example). XLA:CPU runs reductions as library calls that cannot
// fuse their producers, so its batch-norm backward writes the activation gradient and its product
// with the normalised input to memory before summing them (about 8 activation-sized passes where
// 5 suffice; benchmarks/RESULTS.md). Here each pass reads its inputs once:
//   stats:       x                 -> per example mean and sum of squared deviations [N, 2, C]
//   apply:       x, (a, b)         -> act(x * a + b)
//   grad_stats:  x, dy, (a, b, mean, rstd) -> per example sum(dz), sum(dz * x_hat)  [N, 2, C]
//                                     with z = x * a + b, dz = act'(z) * dy, x_hat = (x - mean) * rstd
//   input_grad:  x, dy, (a, b, u, v, w) -> dz * u + x * v + w
// Per-example coefficients ([N, K, C]) keep every call per example, so a sharded batch needs no
// collective inside a call; the statistics of a group of examples are combined in JAX. Sums
// accumulate in float over blocks of 128 rows and in double across blocks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using align_jax::ParallelFor;

namespace {

constexpr int64_t kNone = 0;
constexpr int64_t kSilu = 1;

// exp(x) to ~1 ulp (Cephes' expf polynomial), branch-free so loops over channels vectorise.
inline float Exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (vectorises, unlike std::floor).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + Exp(-z)); }

// The gradient at z = x * a + b of act(z), given the output gradient dy. The activation is a
// template argument: a run-time test inside the channel loop is if-converted, so the loop without
// an activation would compute the sigmoid too.
template <int64_t kActivation>
inline float PreActivationGrad(float x, float a, float b, float dy) {
  if (kActivation != kSilu) return dy;
  const float z = x * a + b;
  const float sig = Sigmoid(z);
  return dy * sig * (1.0f + z * (1.0f - sig));
}

// Software prefetch of the row kAhead floats ahead of `row` (its `c` floats). The hardware
// prefetchers alone leave these loops waiting on memory once a row takes a few dozen cycles of
// arithmetic (the SiLU's exp): block 1's gradient sums took 2.2x the time of a plain read of
// their inputs; with this, they run at memory speed (benchmarks/RESULTS.md, session 8).
constexpr int64_t kAhead = 1024;  // 4 KiB

inline void PrefetchRow(const float* row, int64_t c) {
  for (int64_t i = 0; i < c; i += 16) __builtin_prefetch(row + kAhead + i);
}

struct Shape {
  int64_t n, r, c;
};

ffi::Error CheckShape(ffi::Span<const int64_t> dims, Shape* shape) {
  if (dims.size() != 3) return ffi::Error::InvalidArgument("batch norm: expected x [N, R, C]");
  *shape = Shape{dims[0], dims[1], dims[2]};
  return ffi::Error::Success();
}

ffi::Error CheckPerExample(ffi::Span<const int64_t> dims, const Shape& s, int64_t k, const char* what) {
  if (dims.size() != 3 || dims[0] != s.n || dims[1] != k || dims[2] != s.c) {
    return ffi::Error::InvalidArgument(std::string("batch norm: ") + what + " must be [N, " + std::to_string(k) +
                                       ", C] for x [" + std::to_string(s.n) + ", " + std::to_string(s.r) + ", " +
                                       std::to_string(s.c) + "]");
  }
  return ffi::Error::Success();
}

// Splits each example's R rows into `chunks` ranges so that small local batches still use every
// thread; returns the number of chunks per example.
int64_t ChunksPerExample(ffi::ThreadPool& pool, const Shape& s) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t wanted = (4 * threads + s.n - 1) / s.n;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, s.r / 64));
}

constexpr int64_t kRowBlock = 128;  // rows summed in float before adding into the double totals

// Per example sums over rows: accumulate(n, lo, hi, first, second) adds rows [lo, hi) (at most
// kRowBlock) into two zeroed float [C] vectors, which are added into double totals, so float
// rounding only ever covers 128 terms; out[n, 0, c], out[n, 1, c] = finish(n, c, first, second).
template <typename Accumulate, typename Finish>
void PerExampleSums(ffi::ThreadPool& pool, const Shape& s, float* out, Accumulate accumulate, Finish finish) {
  const int64_t chunks = ChunksPerExample(pool, s);
  std::vector<double> partial(s.n * chunks * 2 * s.c, 0.0);
  ParallelFor(pool, s.n * chunks, [&](int64_t t) {
    const int64_t n = t / chunks, k = t % chunks;
    const int64_t lo = s.r * k / chunks, hi = s.r * (k + 1) / chunks;
    double* total = partial.data() + t * 2 * s.c;
    std::vector<float> block(2 * s.c);
    for (int64_t r = lo; r < hi; r += kRowBlock) {
      std::fill(block.begin(), block.end(), 0.0f);
      accumulate(n, r, std::min(hi, r + kRowBlock), block.data(), block.data() + s.c);
      for (int64_t c = 0; c < 2 * s.c; ++c) total[c] += block[c];
    }
  });
  for (int64_t n = 0; n < s.n; ++n) {
    for (int64_t c = 0; c < s.c; ++c) {
      double a = 0.0, b = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        a += partial[((n * chunks + k) * 2) * s.c + c];
        b += partial[((n * chunks + k) * 2 + 1) * s.c + c];
      }
      finish(n, c, a, b, &out[(n * 2) * s.c + c], &out[(n * 2 + 1) * s.c + c]);
    }
  }
}

// Per-row element-wise pass over every example: fn(n, lo, hi).
template <typename Fn>
void PerExampleRows(ffi::ThreadPool& pool, const Shape& s, Fn fn) {
  const int64_t chunks = ChunksPerExample(pool, s) * 4;
  ParallelFor(pool, s.n * chunks, [&](int64_t t) {
    const int64_t n = t / chunks, k = t % chunks;
    fn(n, s.r * k / chunks, s.r * (k + 1) / chunks);
  });
}

ffi::Error StatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  Shape s;
  if (auto e = CheckShape(x.dimensions(), &s); e.failure()) return e;
  if (auto e = CheckPerExample(out->dimensions(), s, 2, "stats"); e.failure()) return e;
  const float* xd = x.typed_data();
  // Shifted sums (shift = the example's first row, near its mean, so that the one-pass variance
  // does not cancel): mean = shift + S1 / R, m2 = S2 - S1^2 / R.
  const double rows = static_cast<double>(s.r);
  PerExampleSums(
      pool, s, out->typed_data(),
      [&](int64_t n, int64_t lo, int64_t hi, float* s1, float* s2) {
        const float* shift = xd + n * s.r * s.c;
        for (int64_t r = lo; r < hi; ++r) {
          const float* row = xd + (n * s.r + r) * s.c;
          PrefetchRow(row, s.c);
#pragma GCC ivdep
          for (int64_t c = 0; c < s.c; ++c) {
            const float v = row[c] - shift[c];
            s1[c] += v;
            s2[c] += v * v;
          }
        }
      },
      [&](int64_t n, int64_t c, double s1, double s2, float* mean, float* m2) {
        *mean = static_cast<float>(xd[n * s.r * s.c + c] + s1 / rows);
        *m2 = static_cast<float>(std::max(0.0, s2 - s1 * s1 / rows));
      });
  return ffi::Error::Success();
}

ffi::Error ApplyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> coef,
                     ffi::ResultBuffer<ffi::F32> y, int64_t activation) {
  Shape s;
  if (auto e = CheckShape(x.dimensions(), &s); e.failure()) return e;
  if (auto e = CheckPerExample(coef.dimensions(), s, 2, "coefficients"); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* cd = coef.typed_data();
  float* yd = y->typed_data();
  PerExampleRows(pool, s, [&](int64_t n, int64_t lo, int64_t hi) {
    const float* a = cd + (n * 2) * s.c;
    const float* b = a + s.c;
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xd + (n * s.r + r) * s.c;
      float* yr = yd + (n * s.r + r) * s.c;
      PrefetchRow(xr, s.c);
      if (activation == kSilu) {
#pragma GCC ivdep
        for (int64_t c = 0; c < s.c; ++c) {
          const float z = xr[c] * a[c] + b[c];
          yr[c] = z * Sigmoid(z);
        }
      } else {
#pragma GCC ivdep
        for (int64_t c = 0; c < s.c; ++c) yr[c] = xr[c] * a[c] + b[c];
      }
    }
  });
  return ffi::Error::Success();
}

template <int64_t kActivation>
void GradStatsRows(const Shape& s, const float* xd, const float* dd, const float* cd, int64_t n, int64_t lo,
                   int64_t hi, float* s1, float* s2) {
  const float* a = cd + (n * 4) * s.c;
  const float* b = a + s.c;
  const float* mean = b + s.c;
  const float* rstd = mean + s.c;
  for (int64_t r = lo; r < hi; ++r) {
    const float* xr = xd + (n * s.r + r) * s.c;
    const float* dr = dd + (n * s.r + r) * s.c;
    PrefetchRow(xr, s.c);
    PrefetchRow(dr, s.c);
#pragma GCC ivdep
    for (int64_t c = 0; c < s.c; ++c) {
      const float dz = PreActivationGrad<kActivation>(xr[c], a[c], b[c], dr[c]);
      s1[c] += dz;
      s2[c] += dz * ((xr[c] - mean[c]) * rstd[c]);
    }
  }
}

ffi::Error GradStatsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                         ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> out, int64_t activation) {
  Shape s;
  if (auto e = CheckShape(x.dimensions(), &s); e.failure()) return e;
  if (auto e = CheckPerExample(coef.dimensions(), s, 4, "coefficients"); e.failure()) return e;
  if (auto e = CheckPerExample(out->dimensions(), s, 2, "sums"); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* dd = dy.typed_data();
  const float* cd = coef.typed_data();
  PerExampleSums(pool, s, out->typed_data(), [&](int64_t n, int64_t lo, int64_t hi, float* s1, float* s2) {
    if (activation == kSilu) {
      GradStatsRows<kSilu>(s, xd, dd, cd, n, lo, hi, s1, s2);
    } else {
      GradStatsRows<kNone>(s, xd, dd, cd, n, lo, hi, s1, s2);
    }
  }, [](int64_t, int64_t, double s1, double s2, float* first, float* second) {
    *first = static_cast<float>(s1);
    *second = static_cast<float>(s2);
  });
  return ffi::Error::Success();
}

template <int64_t kActivation>
void InputGradRows(const Shape& s, const float* xd, const float* dd, const float* cd, float* od, int64_t n,
                   int64_t lo, int64_t hi) {
  const float* a = cd + (n * 5) * s.c;
  const float* b = a + s.c;
  const float* u = b + s.c;
  const float* v = u + s.c;
  const float* w = v + s.c;
  for (int64_t r = lo; r < hi; ++r) {
    const float* xr = xd + (n * s.r + r) * s.c;
    const float* dr = dd + (n * s.r + r) * s.c;
    float* o = od + (n * s.r + r) * s.c;
    PrefetchRow(xr, s.c);
    PrefetchRow(dr, s.c);
#pragma GCC ivdep
    for (int64_t c = 0; c < s.c; ++c) {
      const float dz = PreActivationGrad<kActivation>(xr[c], a[c], b[c], dr[c]);
      o[c] = dz * u[c] + xr[c] * v[c] + w[c];
    }
  }
}

ffi::Error InputGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                         ffi::Buffer<ffi::F32> coef, ffi::ResultBuffer<ffi::F32> dx, int64_t activation) {
  Shape s;
  if (auto e = CheckShape(x.dimensions(), &s); e.failure()) return e;
  if (auto e = CheckPerExample(coef.dimensions(), s, 5, "coefficients"); e.failure()) return e;
  const float* xd = x.typed_data();
  const float* dd = dy.typed_data();
  const float* cd = coef.typed_data();
  float* od = dx->typed_data();
  PerExampleRows(pool, s, [&](int64_t n, int64_t lo, int64_t hi) {
    if (activation == kSilu) {
      InputGradRows<kSilu>(s, xd, dd, cd, od, n, lo, hi);
    } else {
      InputGradRows<kNone>(s, xd, dd, cd, od, n, lo, hi);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;
#define ALIGN_JAX_POOL ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxBatchNormStats, StatsImpl, ALIGN_JAX_POOL.Arg<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxBatchNormApply, ApplyImpl,
                              ALIGN_JAX_POOL.Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxBatchNormGradStats, GradStatsImpl,
                              ALIGN_JAX_POOL.Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("activation"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxBatchNormInputGrad, InputGradImpl,
                              ALIGN_JAX_POOL.Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Attr<int64_t>("activation"));
