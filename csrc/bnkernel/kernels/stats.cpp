// The statistics kernels of each instruction set's copy: channel_stats, masked_channel_stats.
#include <algorithm>
#include <cstdint>

#include "bnkernel/core/moments.hpp"
#include "bnkernel/dispatch/isa_kernels.hpp"
#include "bnkernel/runtime/threads.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {

template <typename T>
void channel_stats(const T* x, Shape s, double* mean, double* m2) {
  detail::channel_moments(x, s, threads_for(s.size()), mean, m2);
}

template <typename T>
int64_t masked_channel_stats(const T* x, Shape s, const uint8_t* mask, double* mean, double* m2) {
  int64_t count = 0;
  const int64_t positions = s.outer * s.inner;
  for (int64_t p = 0; p < positions; ++p) count += mask[p] != 0;
  detail::masked_channel_moments(x, s, mask, threads_for(s.size()), mean, m2);
  return count;
}

BNKERNEL_INSTANTIATE(BNKERNEL_STATS_KERNELS)

}  // namespace bnkernel::BNKERNEL_ISA_NS
