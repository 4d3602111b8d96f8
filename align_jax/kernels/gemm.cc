// Float32 matrix product on CPU through a BLAS sgemm (Intel MKL's, from the `mkl` wheel), as an
// XLA FFI handler. On the Sapphire Rapids CPUs this project measures on, MKL's sgemm runs BERT's
// shapes at 400-450 GFLOP/s on two cores where XLA:CPU's own matmul library (YNNPACK) reaches
// 290-380 (benchmarks/RESULTS.md); PyTorch calls MKL. The BLAS is not linked: align_jax/kernels/
// gemm.py loads it and hands this library the address of its `cblas_sgemm`.
//
// c[M, N] = op(a) @ op(b), op(t) = t or its transpose (row-major operands, as XLA lays them out).

#include <algorithm>
#include <cstdint>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// cblas_sgemm(layout, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc), LP64.
using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*,
                       int);
Sgemm g_sgemm = nullptr;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                    int64_t trans_a, int64_t trans_b) {
  if (g_sgemm == nullptr) return ffi::Error::Internal("align_jax gemm: no sgemm was registered");
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("align_jax gemm: operands must be matrices");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t kb = trans_b ? bd[1] : bd[0], n = trans_b ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n)
    return ffi::Error::InvalidArgument("align_jax gemm: operand shapes do not match");
  const int64_t limit = INT32_MAX;
  if (ad[0] > limit || ad[1] > limit || bd[0] > limit || bd[1] > limit)
    return ffi::Error::InvalidArgument("align_jax gemm: a dimension exceeds the 32-bit BLAS interface");
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // the BLAS would be handed a leading dimension of 0
    float* out = c->typed_data();
    for (int64_t i = 0; i < m * n; ++i) out[i] = 0.0f;
    return ffi::Error::Success();
  }
  // Rows of c split over XLA's intra-op pool, one sequential sgemm each (the BLAS's own threads
  // would compete with XLA's for the same cores).
  const int64_t lda = ad[1], ldb = bd[1];
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), m / 16));
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  float* cp = c->typed_data();
  align_jax::ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t r0 = m * t / tasks, r1 = m * (t + 1) / tasks;
    if (r1 == r0) return;
    const float* a0 = trans_a ? ap + r0 : ap + r0 * lda;  // row r0 of op(a)
    g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(r1 - r0),
            static_cast<int>(n), static_cast<int>(k), 1.0f, a0, static_cast<int>(lda), bp, static_cast<int>(ldb),
            0.0f, cp + r0 * n, static_cast<int>(n));
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void AlignJaxSetSgemm(void* fn) { g_sgemm = reinterpret_cast<Sgemm>(fn); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlignJaxGemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));
