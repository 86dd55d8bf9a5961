// The parallel drivers: OpenMP regions that carry an exception out (RegionErrors), a region or a
// plain call by thread count, and a channel per task.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#include "bnkernel/core/stores.hpp"
#include "bnkernel/dispatch/isa.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// An exception must not leave an OpenMP region (that is std::terminate, an abort of the Python
// process).  Code in a region that may throw (an allocation) runs under run(): the first exception
// is kept, later work of the region is skipped with failed(), and the caller rethrows after the
// region, where the bindings turn it into a Python exception (std::bad_alloc: MemoryError).  Every
// thread still reaches every worksharing construct, so no barrier waits for a thread that threw.
class RegionErrors {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
#if BNKERNEL_HAVE_OPENMP
#pragma omp critical(bnkernel_region_errors)
#endif
      {
        if (!first_) first_ = std::current_exception();
      }
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  bool failed() const { return failed_.load(std::memory_order_relaxed); }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::exception_ptr first_;
  std::atomic<bool> failed_{false};
};

// body() on `threads` threads: an OpenMP parallel region when threads > 1, else a plain call on
// the calling thread.  The body's worksharing loops must be schedule(static): orphaned, as in the
// plain call, such a loop runs every iteration on the calling thread without the runtime.  (Not a
// region of one thread, `if (threads > 1)`: libgomp allocates a team for each of those, and an
// orphaned dynamic loop its work share, where the plain call allocates nothing.)
template <class F>
void parallel_region(int threads, F&& body) {
  if (threads > 1) {
#if BNKERNEL_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
    body();
  } else {
    body();
  }
}

// task(t) for t in [0, tasks) on `threads` threads, dynamically scheduled a task at a time; each
// thread fences its streaming stores at the end.  An exception from task is rethrown after the
// region (see RegionErrors); with one thread there is no region, so it simply propagates.
template <class F>
void for_each_task(int64_t tasks, int threads, bool stream, F&& task) {
  if (threads <= 1) {
    for (int64_t t = 0; t < tasks; ++t) task(t);
    stream_fence(stream);
    return;
  }
  RegionErrors errors;
#if BNKERNEL_HAVE_OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(dynamic, 1) nowait
#endif
    for (int64_t t = 0; t < tasks; ++t) {
      if (!errors.failed()) errors.run([&] { task(t); });
    }
    stream_fence(stream);
  }
  errors.rethrow();
}

// f(c) for every channel, a channel per task (planar kernels that keep a channel in cache).
template <class F>
void for_each_channel(int64_t channels, int threads, bool stream, F&& f) {
  for_each_task(channels, threads, stream, f);
}

// f(c, next) for every channel, as for_each_channel, where `next` is the channel the same thread
// takes after c (-1 when that is not known), so that it can fetch next's values while it finishes
// c.  Tasks are runs of contiguous channels, several per thread (a thread that falls behind on a
// shared machine leaves the rest to the others): a task's last channel has no known next.
template <class F>
void for_channel_runs_of_tasks(int64_t channels, int threads, bool stream, F&& f) {
  const int64_t per_task = threads <= 1 ? std::max<int64_t>(channels, 1)
                                        : std::max<int64_t>(1, channels / (int64_t{4} * threads));
  for_each_task((channels + per_task - 1) / per_task, threads, stream, [&](int64_t t) {
    const int64_t c1 = std::min(channels, (t + 1) * per_task);
    for (int64_t c = t * per_task; c < c1; ++c) f(c, c + 1 < c1 ? c + 1 : int64_t{-1});
  });
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
