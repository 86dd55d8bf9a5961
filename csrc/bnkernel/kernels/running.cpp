// update_running_stats: scalar code, compiled once (no instruction-set variants).
#include <cstdint>

#include "bnkernel/kernels.hpp"

namespace bnkernel {

// running = (1 - momentum) * running + momentum * batch, the variance M2 / (count - 1) when
// unbiased (M2 / count for a single value), M2 / count otherwise
template <typename T>
void update_running_stats(RunningUpdate<T> running, int64_t channels, int64_t count,
                          const double* mean, const double* m2) {
  const double keep = 1.0 - running.momentum;
  const double denom = static_cast<double>(running.unbiased && count > 1 ? count - 1 : count);
  for (int64_t c = 0; c < channels; ++c) {
    if (running.mean) {
      running.mean[c] =
          static_cast<T>(keep * static_cast<double>(running.mean[c]) + running.momentum * mean[c]);
    }
    if (running.var) {
      running.var[c] = static_cast<T>(keep * static_cast<double>(running.var[c]) +
                                      running.momentum * (m2[c] / denom));
    }
  }
}

template void update_running_stats(RunningUpdate<float>, int64_t, int64_t, const double*,
                                   const double*);
template void update_running_stats(RunningUpdate<double>, int64_t, int64_t, const double*,
                                   const double*);

}  // namespace bnkernel
