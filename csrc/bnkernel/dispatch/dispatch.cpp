// Dispatch: the instruction set picked at load time, and the public entry points that call its copy
// (the one compiled for the best instruction set this CPU supports, see isa.hpp).
#include <cstdlib>
#include <cstring>

#include "bnkernel/kernels.hpp"
#include "bnkernel/runtime/test_hooks.hpp"

namespace bnkernel::baseline {
BNKERNEL_DECLARE(BNKERNEL_KERNELS)
}  // namespace bnkernel::baseline
#if BNKERNEL_HAVE_AVX2
namespace bnkernel::avx2 {
BNKERNEL_DECLARE(BNKERNEL_KERNELS)
}  // namespace bnkernel::avx2
#endif
#if BNKERNEL_HAVE_AVX512
namespace bnkernel::avx512 {
BNKERNEL_DECLARE(BNKERNEL_KERNELS)
}  // namespace bnkernel::avx512
#endif

namespace bnkernel {

namespace {

enum class Isa { baseline, avx2, avx512 };

Isa detect() {
  Isa best = Isa::baseline;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
#if BNKERNEL_HAVE_AVX2
  // (F16C converts float16 in the AVX2 and AVX-512 copies; every CPU with AVX2 has it, but ask)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    best = Isa::avx2;
  }
#endif
#if BNKERNEL_HAVE_AVX512
  if (best == Isa::avx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl")) {
    best = Isa::avx512;
  }
#endif
#endif
  // BNKERNEL_ISA=baseline|avx2 asks for a lower level (for testing every copy on one machine);
  // a level the CPU lacks is never taken.
  if (const char* want = std::getenv("BNKERNEL_ISA")) {
    if (std::strcmp(want, "baseline") == 0) best = Isa::baseline;
    if (std::strcmp(want, "avx2") == 0 && best == Isa::avx512) best = Isa::avx2;
  }
  return best;
}

const Isa active = detect();

}  // namespace

const char* isa_name() {
  switch (active) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

#if BNKERNEL_HAVE_AVX512
#define BNKERNEL_CASE_AVX512(call) \
  case Isa::avx512:                \
    return avx512::call;
#else
#define BNKERNEL_CASE_AVX512(call)
#endif
#if BNKERNEL_HAVE_AVX2
#define BNKERNEL_CASE_AVX2(call) \
  case Isa::avx2:                \
    return avx2::call;
#else
#define BNKERNEL_CASE_AVX2(call)
#endif
#define BNKERNEL_DISPATCH(call) \
  const KernelProbe probe;      \
  switch (active) {             \
    BNKERNEL_CASE_AVX512(call)  \
    BNKERNEL_CASE_AVX2(call)    \
    default:                    \
      return baseline::call;    \
  }

// each kernel of the list: the probe, then the copy for the active instruction set
#define BNKERNEL_FORWARDER(ret, name, params, args) \
  template <typename T>                             \
  ret name params {                                 \
    BNKERNEL_DISPATCH(name args)                    \
  }
BNKERNEL_KERNELS(BNKERNEL_FORWARDER, T)
#undef BNKERNEL_FORWARDER

BNKERNEL_INSTANTIATE(BNKERNEL_KERNELS)

}  // namespace bnkernel
