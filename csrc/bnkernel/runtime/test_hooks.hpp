// The tests' hooks into the kernels: fault injection for the scratch allocations, the switch for
// the certified 16-bit path, and the probe around each kernel call.
#pragma once

// A hook for the tests (tests/test_memory.py): a library preloaded into the process that defines
// bnkernel_kernel_probe is called with +1 as each kernel call starts and -1 as it ends, and counts
// the mallocs in between, on every thread.  Otherwise the weak reference is null, and the probe
// costs a test of it per call.
extern "C" __attribute__((weak, visibility("default"))) void bnkernel_kernel_probe(int delta);

namespace bnkernel {

// Fault injection for the tests: true for the n-th call when BNKERNEL_TEST_FAIL_ALLOC=n was set at
// load time (the kernels' scratch allocations then throw std::bad_alloc), else always false.
bool test_allocation_fails();

// false when BNKERNEL_TEST_DOUBLE_16BIT=1 was set at load time: the 16-bit outputs then take the
// double path alone, never the certified float one (simd/certified.hpp), so that the tests can
// compare the two bit for bit.
bool certify_16bit_outputs();

// bnkernel_kernel_probe(+1) for the object's life, then (-1), when a probe is loaded.
struct KernelProbe {
  KernelProbe() {
    if (bnkernel_kernel_probe) bnkernel_kernel_probe(1);
  }
  ~KernelProbe() {
    if (bnkernel_kernel_probe) bnkernel_kernel_probe(-1);
  }
  KernelProbe(const KernelProbe&) = delete;
  KernelProbe& operator=(const KernelProbe&) = delete;
};

}  // namespace bnkernel
