// Thread-count control.  0 (the default) follows OpenMP's own setting for the calling thread, so
// OMP_NUM_THREADS and threadpoolctl's limits apply; a positive count set from Python pins it for
// every calling thread.  Every kernel takes its count from get_num_threads() (through threads_for),
// so the two rules below hold for all of them:
//
// - At most kMaxThreads.  libgomp starts a team with an alloca of about 128 bytes per thread on the
//   calling thread's stack (measured: 256 threads need a stack of more than 32 KiB, 512 more than
//   64 KiB; on the 8 MiB main stack 65536 threads segfault, and 40000 already fail to be created),
//   so an OpenMP setting above the maximum (OMP_NUM_THREADS=1000000) is clamped to it, and the
//   bindings refuse to pin more.
// - One thread in a forked child.  libgomp's thread pool does not survive fork(): a child forked
//   after a parallel region finds the parent's pool recorded but its threads gone, and its next
//   region waits for them forever.  A pthread_atfork handler marks every forked child, and there
//   every kernel runs on the calling thread alone, on the paths that never enter OpenMP (see
//   detail::parallel_region): get_num_threads() is 1 whatever was pinned or set.
#include "bnkernel/runtime/threads.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "bnkernel/kernels.hpp"

#if BNKERNEL_HAVE_OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define BNKERNEL_HAVE_ATFORK 1
#endif

namespace bnkernel {

namespace {
std::atomic<int> pinned_threads{0};
std::atomic<bool> forked_child{false};

#if defined(BNKERNEL_HAVE_ATFORK)
// async-signal-safe, as a child handler must be: one lock-free store
void mark_forked_child() {
  forked_child.store(true, std::memory_order_relaxed);
}
// registered once, as the library loads (before any kernel can run, so before any fork that
// could matter); a handler stays for the process's life and is inherited by its children
const int atfork_registered = pthread_atfork(nullptr, nullptr, mark_forked_child);
#endif
}  // namespace

void set_num_threads(int n) {
  pinned_threads.store(n > 0 ? std::min(n, kMaxThreads) : 0);
}

int get_num_threads() {
  if (forked_child.load(std::memory_order_relaxed)) return 1;
  const int pinned = pinned_threads.load();
  if (pinned > 0) return pinned;
#if BNKERNEL_HAVE_OPENMP
  const int openmp = omp_get_max_threads();
  return openmp < 1 ? 1 : (openmp > kMaxThreads ? kMaxThreads : openmp);
#else
  return 1;
#endif
}

bool have_openmp() {
  return BNKERNEL_HAVE_OPENMP != 0;
}

int threads_for(int64_t elements) {
#if BNKERNEL_HAVE_OPENMP
  return elements < kParallelMinElements ? 1 : get_num_threads();
#else
  (void)elements;
  return 1;
#endif
}

int thread_index() {
#if BNKERNEL_HAVE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace bnkernel
