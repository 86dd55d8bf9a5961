// The backward passes: the fused reduction, the elementwise dx, and the two fused paths.
#include <cstdint>

#include "bnkernel/core/elementwise.hpp"
#include "bnkernel/core/layout.hpp"
#include "bnkernel/core/parallel.hpp"
#include "bnkernel/core/plan.hpp"
#include "bnkernel/core/sums.hpp"
#include "bnkernel/dispatch/isa_kernels.hpp"
#include "bnkernel/runtime/threads.hpp"
#include "bnkernel/runtime/workspace.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {

namespace {

// Per-channel coefficients of dx = k_scale * (dy - k_dy - (x - mean) * k_x).
struct GradCoefficients {
  double k_scale, k_dy, k_x;
};

template <typename P>
inline GradCoefficients grad_coefficients(const P* gamma, const double* invstd,
                                          const double* sum_dy, const double* sum_dy_xhat, double m,
                                          int64_t c) {
  return {detail::gamma_of(gamma, c) * invstd[c], sum_dy[c] / m, invstd[c] * sum_dy_xhat[c] / m};
}

template <typename P>
void store_param_grads(Shape s, const double* sum_dy, const double* sum_dy_xhat, P* dgamma,
                       P* dbeta) {
  for (int64_t c = 0; c < s.channels; ++c) {
    if (dgamma) dgamma[c] = static_cast<P>(sum_dy_xhat[c]);
    if (dbeta) dbeta[c] = static_cast<P>(sum_dy[c]);
  }
}

enum class Mode { train, frozen };

/*
 * Both backward paths.  With xhat = (x - mean) * invstd:
 *   dbeta = sum(dy),  dgamma = sum(dy * xhat)
 *   train:  dx = gamma * invstd / m * (m * dy - dbeta - xhat * dgamma)
 *   frozen: dx = gamma * invstd * dy
 */
template <typename T>
void backward(Mode mode, const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
              const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta, ReluGrad<T> relu) {
  const int64_t C = s.channels;
  const auto m = static_cast<double>(s.per_channel());
  const int threads = threads_for(s.size());
  const bool stream_runs = detail::stream_channel_runs(dx, s);
  Workspace ws;
  double* sum_dy = ws.take<double>(C);
  double* sum_dy_xhat = ws.take<double>(C);

  if (detail::fuse_per_channel(s, threads, 2 * s.per_channel() * static_cast<int64_t>(sizeof(T)))) {
    // one channel per task: its sums, then its dx while (dy, x) are still in cache
    // (and the next channel's dy and x fetched into L2 while this one's dx is written)
    detail::for_channel_runs_of_tasks(C, threads, stream_runs, [&](int64_t c, int64_t next) {
      double& sdy = sum_dy[c];
      double& sdyx = sum_dy_xhat[c];
      detail::planar_channel_sums(dy, x, s, c, mean[c], 1, sdy, sdyx, relu);
      sdyx *= invstd[c];
      const auto k = grad_coefficients(gamma, invstd, sum_dy, sum_dy_xhat, m, c);
      const int64_t to_next = (next - c) * s.inner;
      detail::for_channel_rows(s, c, [&](int64_t offset) {
        const T* y = relu.y ? relu.y + offset : nullptr;
        const auto fetch = next >= 0
                               ? detail::NextRuns<T>{dy + offset + to_next, x + offset + to_next}
                               : detail::NextRuns<T>{};
        if (mode == Mode::train) {
          detail::grad_run(dy + offset, x + offset, y, dx + offset, s.inner, mean[c], k.k_scale,
                           k.k_dy, k.k_x, stream_runs, fetch);
        } else {
          detail::scale_run(dy + offset, y, dx + offset, s.inner, k.k_scale, stream_runs, fetch);
        }
      });
    });
  } else {
    // the split phases, in this namespace (qualified: Shape brings bnkernel:: in by ADL)
    BNKERNEL_ISA_NS::backward_reduce(dy, x, s, mean, invstd, sum_dy, sum_dy_xhat, relu);
    if (mode == Mode::train) {
      BNKERNEL_ISA_NS::backward_elementwise(dy, x, s, mean, invstd, gamma, sum_dy, sum_dy_xhat,
                                            s.per_channel(), dx, relu);
    } else {
      double* k_scale = ws.take<double>(C);
      for (int64_t c = 0; c < C; ++c) k_scale[c] = detail::gamma_of(gamma, c) * invstd[c];
      detail::scale(dy, relu.y, s, k_scale, dx, threads);
    }
  }
  store_param_grads(s, sum_dy, sum_dy_xhat, dgamma, dbeta);
}

}  // namespace

template <typename T>
void backward_reduce(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                     double* sum_dy, double* sum_dy_xhat, ReluGrad<T> relu) {
  detail::channel_sums(dy, x, s, mean, threads_for(s.size()), sum_dy, sum_dy_xhat, relu);
  for (int64_t c = 0; c < s.channels; ++c) sum_dy_xhat[c] *= invstd[c];
}

namespace {

// dx from the sums (both elementwise kernels): the training dx, or with a position mask the
// masked one (valid positions the same, padded ones the direct term)
template <typename T>
void elementwise_dx(const T* dy, const T* x, Shape s, const uint8_t* mask, const double* mean,
                    const double* invstd, const Param<T>* gamma, const double* sum_dy,
                    const double* sum_dy_xhat, int64_t count, T* dx, ReluGrad<T> relu) {
  const int64_t C = s.channels;
  const auto m = static_cast<double>(count);
  Workspace ws;
  double* k_scale = ws.take<double>(C);
  double* k_dy = ws.take<double>(C);
  double* k_x = ws.take<double>(C);
  for (int64_t c = 0; c < C; ++c) {
    const auto k = grad_coefficients(gamma, invstd, sum_dy, sum_dy_xhat, m, c);
    k_scale[c] = k.k_scale;
    k_dy[c] = k.k_dy;
    k_x[c] = k.k_x;
  }
  if (mask) {
    detail::masked_grad(dy, x, relu.y, mask, s, mean, k_scale, k_dy, k_x, dx,
                        threads_for(s.size()));
  } else {
    detail::grad(dy, x, relu.y, s, mean, k_scale, k_dy, k_x, dx, threads_for(s.size()));
  }
}

}  // namespace

template <typename T>
void backward_elementwise(const T* dy, const T* x, Shape s, const double* mean,
                          const double* invstd, const Param<T>* gamma, const double* sum_dy,
                          const double* sum_dy_xhat, int64_t count, T* dx, ReluGrad<T> relu) {
  elementwise_dx(dy, x, s, static_cast<const uint8_t*>(nullptr), mean, invstd, gamma, sum_dy,
                 sum_dy_xhat, count, dx, relu);
}

template <typename T>
void masked_backward_elementwise(const T* dy, const T* x, Shape s, const uint8_t* mask,
                                 const double* mean, const double* invstd, const Param<T>* gamma,
                                 const double* sum_dy, const double* sum_dy_xhat, int64_t count,
                                 T* dx, ReluGrad<T> relu) {
  elementwise_dx(dy, x, s, mask, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, dx, relu);
}

template <typename T>
void backward_train(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                    const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta,
                    ReluGrad<T> relu) {
  backward(Mode::train, dy, x, s, mean, invstd, gamma, dx, dgamma, dbeta, relu);
}

template <typename T>
void backward_frozen(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                     const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta,
                     ReluGrad<T> relu) {
  backward(Mode::frozen, dy, x, s, mean, invstd, gamma, dx, dgamma, dbeta, relu);
}

BNKERNEL_INSTANTIATE(BNKERNEL_BACKWARD_KERNELS)

}  // namespace bnkernel::BNKERNEL_ISA_NS
