// The public kernel entry points: each forwards to the copy compiled for the best instruction set
// this CPU supports (see isa.hpp).
#include <cstdlib>
#include <cstring>

#include "bnkernel/kernels.hpp"

namespace bnkernel::baseline {
#include "bnkernel/kernel_api.inc"
}  // namespace bnkernel::baseline
#if BNKERNEL_HAVE_AVX2
namespace bnkernel::avx2 {
#include "bnkernel/kernel_api.inc"
}  // namespace bnkernel::avx2
#endif
#if BNKERNEL_HAVE_AVX512
namespace bnkernel::avx512 {
#include "bnkernel/kernel_api.inc"
}  // namespace bnkernel::avx512
#endif

// A hook for the tests (tests/test_memory.py): a library preloaded into the process that defines
// bnkernel_kernel_probe is called with +1 as each kernel call starts and -1 as it ends, and counts
// the mallocs in between, on every thread.  Otherwise the weak reference is null, and the probe
// costs a test of it per call.
extern "C" __attribute__((weak, visibility("default"))) void bnkernel_kernel_probe(int delta);

namespace bnkernel {

namespace {

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

template <typename T>
void channel_stats(const T* x, Shape s, double* mean, double* m2) {
  BNKERNEL_DISPATCH(channel_stats(x, s, mean, m2))
}

template <typename T>
int64_t masked_channel_stats(const T* x, Shape s, const uint8_t* mask, double* mean, double* m2) {
  BNKERNEL_DISPATCH(masked_channel_stats(x, s, mask, mean, m2))
}

template <typename T>
void masked_backward_elementwise(const T* dy, const T* x, Shape s, const uint8_t* mask,
                                 const double* mean, const double* invstd, const Param<T>* gamma,
                                 const double* sum_dy, const double* sum_dy_xhat, int64_t count,
                                 T* dx, ReluGrad<T> relu) {
  BNKERNEL_DISPATCH(masked_backward_elementwise(dy, x, s, mask, mean, invstd, gamma, sum_dy,
                                                sum_dy_xhat, count, dx, relu))
}

template <typename T>
void normalize(const T* x, Shape s, const double* mean, const double* invstd, const Param<T>* gamma,
               const Param<T>* beta, T* y, Epilogue<T> epilogue) {
  BNKERNEL_DISPATCH(normalize(x, s, mean, invstd, gamma, beta, y, epilogue))
}

template <typename T>
void forward_train(const T* x, Shape s, const Param<T>* gamma, const Param<T>* beta, double eps,
                   T* y, double* mean, double* invstd, RunningUpdate<Param<T>> running,
                   Epilogue<T> epilogue) {
  BNKERNEL_DISPATCH(forward_train(x, s, gamma, beta, eps, y, mean, invstd, running, epilogue))
}

template <typename T>
void backward_reduce(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                     double* sum_dy, double* sum_dy_xhat, ReluGrad<T> relu) {
  BNKERNEL_DISPATCH(backward_reduce(dy, x, s, mean, invstd, sum_dy, sum_dy_xhat, relu))
}

template <typename T>
void backward_elementwise(const T* dy, const T* x, Shape s, const double* mean,
                          const double* invstd, const Param<T>* gamma, const double* sum_dy,
                          const double* sum_dy_xhat, int64_t count, T* dx, ReluGrad<T> relu) {
  BNKERNEL_DISPATCH(
      backward_elementwise(dy, x, s, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, dx, relu))
}

template <typename T>
void backward_train(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                    const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta,
                    ReluGrad<T> relu) {
  BNKERNEL_DISPATCH(backward_train(dy, x, s, mean, invstd, gamma, dx, dgamma, dbeta, relu))
}

template <typename T>
void backward_frozen(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                     const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta,
                     ReluGrad<T> relu){
    BNKERNEL_DISPATCH(backward_frozen(dy, x, s, mean, invstd, gamma, dx, dgamma, dbeta, relu))}

#define BNKERNEL_INSTANTIATE(T)                                                                  \
  template void channel_stats<T>(const T*, Shape, double*, double*);                             \
  template int64_t masked_channel_stats<T>(const T*, Shape, const uint8_t*, double*, double*);   \
  template void masked_backward_elementwise<T>(                                                  \
      const T*, const T*, Shape, const uint8_t*, const double*, const double*, const Param<T>*,  \
      const double*, const double*, int64_t, T*, ReluGrad<T>);                                   \
  template void normalize<T>(const T*, Shape, const double*, const double*, const Param<T>*,     \
                             const Param<T>*, T*, Epilogue<T>);                                  \
  template void forward_train<T>(const T*, Shape, const Param<T>*, const Param<T>*, double, T*,  \
                                 double*, double*, RunningUpdate<Param<T>>, Epilogue<T>);        \
  template void backward_reduce<T>(const T*, const T*, Shape, const double*, const double*,      \
                                   double*, double*, ReluGrad<T>);                               \
  template void backward_elementwise<T>(const T*, const T*, Shape, const double*, const double*, \
                                        const Param<T>*, const double*, const double*, int64_t,  \
                                        T*, ReluGrad<T>);                                        \
  template void backward_train<T>(const T*, const T*, Shape, const double*, const double*,       \
                                  const Param<T>*, T*, Param<T>*, Param<T>*, ReluGrad<T>);       \
  template void backward_frozen<T>(const T*, const T*, Shape, const double*, const double*,      \
                                   const Param<T>*, T*, Param<T>*, Param<T>*, ReluGrad<T>);
// (one per line: clang-format would otherwise join the expansions into one line)
BNKERNEL_INSTANTIATE(float) BNKERNEL_INSTANTIATE(double) BNKERNEL_INSTANTIATE(float16)
    BNKERNEL_INSTANTIATE(bfloat16)
#undef BNKERNEL_INSTANTIATE

}  // namespace bnkernel
