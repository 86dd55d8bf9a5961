// Thread-count control.  0 (the default) follows OpenMP's own setting for the calling thread, so
// OMP_NUM_THREADS and threadpoolctl's limits apply; a positive count set from Python pins it for
// every calling thread.
#include <atomic>
#include <cstdlib>

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

namespace {
// BNKERNEL_TEST_FAIL_ALLOC=n (tests only): the n-th scratch allocation fails, as if out of memory
int64_t initial_countdown() {
  const char* v = std::getenv("BNKERNEL_TEST_FAIL_ALLOC");
  return v ? std::strtoll(v, nullptr, 10) : 0;
}
std::atomic<int64_t> fail_countdown{initial_countdown()};
}  // namespace

bool test_allocation_fails() {
  if (fail_countdown.load(std::memory_order_relaxed) <= 0) return false;
  return fail_countdown.fetch_sub(1) == 1;
}

int thread_index() {
#if BNKERNEL_HAVE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace bnkernel
