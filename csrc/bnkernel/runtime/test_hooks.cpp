// The fault injection of test_hooks.hpp: BNKERNEL_TEST_FAIL_ALLOC=n fails the n-th allocation.
#include "bnkernel/runtime/test_hooks.hpp"

#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace bnkernel {

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

}  // namespace bnkernel
