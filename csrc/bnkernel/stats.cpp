// channel_stats and merge_stats.
#include <algorithm>
#include <cstdint>

#include "bnkernel/kernels.hpp"
#include "bnkernel/reductions.hpp"

namespace bnkernel {

template <typename T>
void channel_stats(const T* x, Shape s, double* mean, double* m2) {
  const int threads = detail::threads_for(s.size());
  if (s.inner == 1) {
    detail::interleaved_moments(x, s, threads, mean, m2);
  } else if (detail::whole_channels_per_thread(s, threads)) {
#if BNKERNEL_HAVE_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
#endif
    for (int64_t c = 0; c < s.channels; ++c) {
      detail::planar_channel_moments(x, s, c, 1, mean[c], m2[c]);
    }
  } else {
    for (int64_t c = 0; c < s.channels; ++c) {
      detail::planar_channel_moments(x, s, c, threads, mean[c], m2[c]);
    }
  }
}

void merge_stats(int64_t parts, int64_t channels, const int64_t* counts, const double* means,
                 const double* m2s, int64_t* count, double* mean, double* m2) {
  std::fill(mean, mean + channels, 0.0);
  std::fill(m2, m2 + channels, 0.0);
  int64_t total = 0;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t nb = counts[p];
    if (nb == 0) continue;
    const double* meanb = means + p * channels;
    const double* m2b = m2s + p * channels;
    for (int64_t c = 0; c < channels; ++c) {
      double n = static_cast<double>(total);
      detail::chan_merge(n, mean[c], m2[c], static_cast<double>(nb), meanb[c], m2b[c]);
    }
    total += nb;
  }
  *count = total;
}

template void channel_stats<float>(const float*, Shape, double*, double*);
template void channel_stats<double>(const double*, Shape, double*, double*);

}  // namespace bnkernel
