// The tests' switches of test_hooks.hpp: BNKERNEL_TEST_FAIL_ALLOC=n fails the n-th allocation,
// BNKERNEL_TEST_DOUBLE_16BIT=1 turns the certified 16-bit path off.
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
// BNKERNEL_TEST_DOUBLE_16BIT=1 (tests only): no certified float path for 16-bit outputs
bool initial_certify() {
  const char* v = std::getenv("BNKERNEL_TEST_DOUBLE_16BIT");
  return !(v && v[0] == '1');
}
const bool certify = initial_certify();
}  // namespace

bool certify_16bit_outputs() {
  return certify;
}

bool test_allocation_fails() {
  if (fail_countdown.load(std::memory_order_relaxed) <= 0) return false;
  return fail_countdown.fetch_sub(1) == 1;
}

}  // namespace bnkernel
