// Work sharing on XLA's intra-op thread pool for the FFI handlers in this directory.

#ifndef ALIGN_JAX_KERNELS_PARALLEL_H_
#define ALIGN_JAX_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace align_jax {

struct Shared {
  std::function<void(int64_t)> fn;
  int64_t tasks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Runs fn(t) for t in [0, tasks) on the calling thread and on the intra-op pool's threads. The
// caller takes tasks too and never waits for a helper that has not started, so two handlers
// running at once on a two-thread pool cannot deadlock.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, const std::function<void(int64_t)>& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  auto shared = std::make_shared<Shared>();
  shared->fn = fn;
  shared->tasks = tasks;
  auto work = [shared]() {
    int64_t count = 0;
    for (int64_t t; (t = shared->next.fetch_add(1)) < shared->tasks; ++count) shared->fn(t);
    if (count > 0 && shared->done.fetch_add(count) + count == shared->tasks) {
      std::lock_guard<std::mutex> lock(shared->mu);
      shared->cv.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == shared->tasks; });
}

}  // namespace align_jax

#endif  // ALIGN_JAX_KERNELS_PARALLEL_H_
