// The forward kernels of each instruction set's copy: normalize and the fused training forward.
#include <cmath>
#include <cstdint>

#include "bnkernel/core/elementwise.hpp"
#include "bnkernel/core/layout.hpp"
#include "bnkernel/core/moments.hpp"
#include "bnkernel/core/parallel.hpp"
#include "bnkernel/core/plan.hpp"
#include "bnkernel/dispatch/isa_kernels.hpp"
#include "bnkernel/runtime/threads.hpp"
#include "bnkernel/runtime/workspace.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {

template <typename T>
void normalize(const T* x, Shape s, const double* mean, const double* invstd, const Param<T>* gamma,
               const Param<T>* beta, T* y, Epilogue<T> epilogue) {
  const int64_t C = s.channels;
  Workspace ws;
  double* scale = ws.take<double>(C);
  double* shift = ws.take<double>(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = detail::gamma_of(gamma, c) * invstd[c];
    shift[c] = detail::beta_of(beta, c);
  }
  detail::affine(x, s, mean, scale, shift, y, threads_for(s.size()), epilogue);
}

/*
 * Training forward, per channel over its m values:
 *   mean = sum(x) / m,  var = M2 / m (biased),  invstd = 1 / sqrt(var + eps)
 *   y = epilogue((x - mean) * (gamma * invstd) + beta)
 */
template <typename T>
void forward_train(const T* x, Shape s, const Param<T>* gamma, const Param<T>* beta, double eps,
                   T* y, double* mean, double* invstd, RunningUpdate<Param<T>> running,
                   Epilogue<T> epilogue) {
  const int64_t C = s.channels;
  const auto m = static_cast<double>(s.per_channel());
  const int threads = threads_for(s.size());
  const bool stream_runs = detail::stream_channel_runs(y, s);
  Workspace ws;
  double* m2 = ws.take<double>(C);

  if (detail::fuse_per_channel(s, threads, s.per_channel() * static_cast<int64_t>(sizeof(T)))) {
    // one channel per task: its statistics, then its normalize while it is still in cache
    // (and the next channel's rows fetched into L2 while this one's are written, so that its
    // statistics read from cache: the reads of one channel overlap the writes of another)
    detail::for_channel_runs_of_tasks(C, threads, stream_runs, [&](int64_t c, int64_t next) {
      double& m2c = m2[c];
      detail::planar_channel_moments(x, s, c, 1, mean[c], m2c);
      invstd[c] = 1.0 / std::sqrt(m2c / m + eps);
      const double scale = detail::gamma_of(gamma, c) * invstd[c];
      const double shift = detail::beta_of(beta, c);
      const int64_t to_next = (next - c) * s.inner;
      detail::for_channel_rows(s, c, [&](int64_t offset) {
        detail::affine_run(x + offset, y + offset, s.inner, mean[c], scale, shift, stream_runs,
                           epilogue.residual ? epilogue.residual + offset : nullptr, epilogue.relu,
                           detail::NextRuns<T>{next >= 0 ? x + offset + to_next : nullptr});
      });
    });
  } else {
    // the split phases, in this namespace (qualified: Shape brings bnkernel:: in by ADL)
    BNKERNEL_ISA_NS::channel_stats(x, s, mean, m2);
    for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(m2[c] / m + eps);
    BNKERNEL_ISA_NS::normalize(x, s, mean, invstd, gamma, beta, y, epilogue);
  }
  update_running_stats(running, C, s.per_channel(), mean, m2);
}

BNKERNEL_INSTANTIATE(BNKERNEL_FORWARD_KERNELS)

}  // namespace bnkernel::BNKERNEL_ISA_NS
