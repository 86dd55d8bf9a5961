// merge_stats: scalar code, compiled once (no instruction-set variants).
#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "bnkernel/core/chan_merge.hpp"
#include "bnkernel/kernels.hpp"

namespace bnkernel {

void merge_stats(int64_t parts, int64_t channels, const int64_t* counts, const double* means,
                 const double* m2s, int64_t* count, double* mean, double* m2) {
  // the total first, so that a count that does not fit leaves the outputs as they were
  int64_t total = 0;
  for (int64_t p = 0; p < parts; ++p) {
    if (__builtin_add_overflow(total, counts[p], &total)) {
      throw std::overflow_error("counts: the total count does not fit in int64");
    }
  }
  std::fill(mean, mean + channels, 0.0);
  std::fill(m2, m2 + channels, 0.0);
  total = 0;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t nb = counts[p];
    if (nb == 0) continue;
    const double* meanb = means + p * channels;
    const double* m2b = m2s + p * channels;
    for (int64_t c = 0; c < channels; ++c) {
      double n = static_cast<double>(total);
      BNKERNEL_ISA_NS::detail::chan_merge(n, mean[c], m2[c], static_cast<double>(nb), meanb[c],
                                          m2b[c]);
    }
    total += nb;
  }
  *count = total;
}

}  // namespace bnkernel
