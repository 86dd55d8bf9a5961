// Thread-count control.  0 (the default) follows OpenMP's own setting for the calling thread, so
// OMP_NUM_THREADS and threadpoolctl's limits apply; a positive count set from Python pins it for
// every calling thread.
#include <atomic>

#include "bnkernel/kernels.hpp"

#if BNKERNEL_HAVE_OPENMP
#include <omp.h>
#endif

namespace bnkernel {

namespace {
std::atomic<int> pinned_threads{0};
}

void set_num_threads(int n) {
  pinned_threads.store(n > 0 ? n : 0);
}

int get_num_threads() {
  const int pinned = pinned_threads.load();
  if (pinned > 0) return pinned;
#if BNKERNEL_HAVE_OPENMP
  return omp_get_max_threads();
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
