// channel_stats and merge_stats.
#include <algorithm>
#include <cstdint>

#include "bnkernel/isa_kernels.hpp"
#include "bnkernel/reductions.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {

template <typename T>
void channel_stats(const T* x, Shape s, double* mean, double* m2) {
  const int threads = threads_for(s.size());
  if (s.inner == 1) {
    detail::interleaved_moments(x, s, threads, mean, m2);
  } else if (detail::whole_channels_per_thread(s, threads)) {
    detail::for_each_channel(s.channels, threads, false, [&](int64_t c) {
      detail::planar_channel_moments(x, s, c, 1, mean[c], m2[c]);
    });
  } else {
    for (int64_t c = 0; c < s.channels; ++c) {
      detail::planar_channel_moments(x, s, c, threads, mean[c], m2[c]);
    }
  }
}

template void channel_stats<float>(const float*, Shape, double*, double*);
template void channel_stats<double>(const double*, Shape, double*, double*);

}  // namespace bnkernel::BNKERNEL_ISA_NS
