// bnkernel: batch-normalization kernels on plain pointers.
//
// Every input is a C-contiguous array viewed as (outer, channels, inner): element (o, c, i) sits at
// x[(o * channels + c) * inner + i].  (N, C) is inner = 1; NCHW is outer = N, inner = H*W;
// channels-last is outer = N*H*W, inner = 1.  The kernels know nothing of Python.
//
// Statistics and the per-channel reductions are always carried in double, whatever T is, and are
// exchanged in double (mean, M2, invstd, the backward sums) so that composing the split phases
// loses nothing against the fused paths.
//
// Determinism: each channel's values are cut into fixed leaves (their size depends only on the
// shape) and the leaves are combined along a fixed pairwise tree.  Threads only decide who computes
// which subtree, so 1 and N threads give bit-identical results.
#pragma once

#include <cstdint>

namespace bnkernel {

struct Shape {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
  int64_t per_channel() const { return outer * inner; }
  int64_t size() const { return outer * channels * inner; }
};

// Running-statistics update, applied after the batch statistics are known:
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_var  = (1 - momentum) * running_var  + momentum * var * (unbiased ? m / (m - 1) : 1)
// Either pointer may be null.  Keras' `moving = m*moving + (1-m)*batch` is momentum = 1 - m.
template <typename T>
struct RunningUpdate {
  T* mean = nullptr;
  T* var = nullptr;
  double momentum = 0.1;
  bool unbiased = true;
};

// ---- statistics ---------------------------------------------------------------------------------

// Per-channel mean and M2 = sum((x - mean)^2) over the outer * inner values of each channel.
template <typename T>
void channel_stats(const T* x, Shape s, double* mean, double* m2);

// Chan et al.'s pairwise merge of `parts` partial statistics, applied left to right:
//   n = nA + nB;  d = meanB - meanA;  mean = meanA + d * nB / n;  M2 = M2A + M2B + d^2 * nA * nB /
//   n
// means and m2s are (parts, channels) row-major.  Parts with a count of 0 are neutral.
void merge_stats(int64_t parts, int64_t channels, const int64_t* counts, const double* means,
                 const double* m2s, int64_t* count, double* mean, double* m2);

// ---- forward ------------------------------------------------------------------------------------

// y = (x - mean) * (gamma * invstd) + beta, computed in double.  gamma/beta may be null (1 and 0).
template <typename T>
void normalize(const T* x, Shape s, const double* mean, const double* invstd, const T* gamma,
               const T* beta, T* y);

// Training forward: batch statistics, invstd = 1 / sqrt(var + eps) with the biased var, then
// normalize; writes the saved mean / invstd (double, length channels) and updates running stats.
template <typename T>
void forward_train(const T* x, Shape s, const T* gamma, const T* beta, double eps, T* y,
                   double* mean, double* invstd, RunningUpdate<T> running);

// ---- backward -----------------------------------------------------------------------------------

// sum_dy = sum(dy),  sum_dy_xhat = sum(dy * (x - mean) * invstd), both in one read of (dy, x).
template <typename T>
void backward_reduce(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                     double* sum_dy, double* sum_dy_xhat);

// dx = gamma * invstd * (dy - sum_dy / m - xhat * sum_dy_xhat / m), m = count (the global count
// when the sums come from several processes).  gamma may be null (1).
template <typename T>
void backward_elementwise(const T* dy, const T* x, Shape s, const double* mean,
                          const double* invstd, const T* gamma, const double* sum_dy,
                          const double* sum_dy_xhat, int64_t count, T* dx);

// Training backward (statistics depend on x): reduce + elementwise, dgamma = sum_dy_xhat,
// dbeta = sum_dy.  dgamma / dbeta may be null.
template <typename T>
void backward_train(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                    const T* gamma, T* dx, T* dgamma, T* dbeta);

// Frozen-statistics backward: dx = dy * gamma * invstd, dgamma / dbeta as in training.
template <typename T>
void backward_frozen(const T* dy, const T* x, Shape s, const double* mean, const double* invstd,
                     const T* gamma, T* dx, T* dgamma, T* dbeta);

// ---- threads ------------------------------------------------------------------------------------

// 0 means "follow OpenMP" (OMP_NUM_THREADS, threadpoolctl limits); n > 0 pins the count.
void set_num_threads(int n);
int get_num_threads();
bool have_openmp();

}  // namespace bnkernel
