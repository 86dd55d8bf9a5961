// The list of kernels, each written once, and the data types they are made for: the macros below
// declare them, define the dispatching entry points (dispatch/dispatch.cpp) and instantiate each
// instruction set's copy (kernels/stats.cpp, forward.cpp, backward.cpp) from it.
//
// An entry is X(return type, name, (parameters), (arguments)), T standing for the data type
// (float, double, float16 or bfloat16; Param<T>, half.hpp, is the parameters' type); the arguments
// are the parameters' names, in order.  A kernel added to the list of its direction is declared
// in bnkernel (the public entry point, which dispatches) and in each bnkernel::<isa> namespace, and
// instantiated for every type; it is then defined once, in its direction's source.
#pragma once

// ---- statistics (kernels/stats.cpp)
// -----------------------------------------------------------------
//
// channel_stats: per-channel mean and M2 = sum((x - mean)^2) over the outer * inner values of each
// channel.
// masked_channel_stats: the same over the positions where `mask` is nonzero: mask has one byte per
// (o, i), at o * inner + i (x's shape without the channel axis, C order).  Returns the number of
// valid positions (every channel's count); a channel with none gets mean = M2 = 0.
#define BNKERNEL_STATS_KERNELS(X, T)                                                        \
  X(void, channel_stats, (const T* x, Shape s, double* mean, double* m2), (x, s, mean, m2)) \
  X(int64_t, masked_channel_stats,                                                          \
    (const T* x, Shape s, const uint8_t* mask, double* mean, double* m2), (x, s, mask, mean, m2))

// ---- forward (kernels/forward.cpp)
// ------------------------------------------------------------------
//
// normalize: y = (x - mean) * (gamma * invstd) + beta, computed in double.  gamma/beta may be null
// (1 and 0).  The epilogue (residual add, ReLU) is applied before the rounding.
// forward_train: batch statistics, invstd = 1 / sqrt(var + eps) with the biased var, then
// normalize; writes the saved mean / invstd (double, length channels) and updates running stats.
#define BNKERNEL_FORWARD_KERNELS(X, T)                                                     \
  X(void, normalize,                                                                       \
    (const T* x, Shape s, const double* mean, const double* invstd, const Param<T>* gamma, \
     const Param<T>* beta, T* y, Epilogue<T> epilogue),                                    \
    (x, s, mean, invstd, gamma, beta, y, epilogue))                                        \
  X(void, forward_train,                                                                   \
    (const T* x, Shape s, const Param<T>* gamma, const Param<T>* beta, double eps, T* y,   \
     double* mean, double* invstd, RunningUpdate<Param<T>> running, Epilogue<T> epilogue), \
    (x, s, gamma, beta, eps, y, mean, invstd, running, epilogue))

// ---- backward (kernels/backward.cpp)
// ----------------------------------------------------------------
//
// backward_reduce: sum_dy = sum(g),  sum_dy_xhat = sum(g * (x - mean) * invstd), both in one read
// of (dy, x), with g = dy, or the ReLU-masked dy (see ReluGrad), also written to relu.dresidual
// when given.
// backward_elementwise: dx = gamma * invstd * (dy - sum_dy / m - xhat * sum_dy_xhat / m),
// m = count (the global count when the sums come from several processes).  gamma may be null (1).
// With relu.y, dy is masked as in backward_reduce (relu.dresidual is not used here).
// masked_backward_elementwise: backward_elementwise under the mask (as in masked_channel_stats)
// the statistics came from: the sums are over every position (every output depends on the
// statistics) and count is the number of valid ones; a padded position gets only the direct term,
//   dx = gamma * invstd * (dy - valid * (sum_dy / m + xhat * sum_dy_xhat / m)).
// backward_train: training backward (statistics depend on x): reduce + elementwise,
// dgamma = sum_dy_xhat, dbeta = sum_dy.  dgamma / dbeta may be null.
// backward_frozen: frozen-statistics backward: dx = dy * gamma * invstd, dgamma / dbeta as in
// training.
#define BNKERNEL_BACKWARD_KERNELS(X, T)                                                            \
  X(void, backward_reduce,                                                                         \
    (const T* dy, const T* x, Shape s, const double* mean, const double* invstd, double* sum_dy,   \
     double* sum_dy_xhat, ReluGrad<T> relu),                                                       \
    (dy, x, s, mean, invstd, sum_dy, sum_dy_xhat, relu))                                           \
  X(void, backward_elementwise,                                                                    \
    (const T* dy, const T* x, Shape s, const double* mean, const double* invstd,                   \
     const Param<T>* gamma, const double* sum_dy, const double* sum_dy_xhat, int64_t count, T* dx, \
     ReluGrad<T> relu),                                                                            \
    (dy, x, s, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, dx, relu))                         \
  X(void, masked_backward_elementwise,                                                             \
    (const T* dy, const T* x, Shape s, const uint8_t* mask, const double* mean,                    \
     const double* invstd, const Param<T>* gamma, const double* sum_dy, const double* sum_dy_xhat, \
     int64_t count, T* dx, ReluGrad<T> relu),                                                      \
    (dy, x, s, mask, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, dx, relu))                   \
  X(void, backward_train,                                                                          \
    (const T* dy, const T* x, Shape s, const double* mean, const double* invstd,                   \
     const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta, ReluGrad<T> relu),           \
    (dy, x, s, mean, invstd, gamma, dx, dgamma, dbeta, relu))                                      \
  X(void, backward_frozen,                                                                         \
    (const T* dy, const T* x, Shape s, const double* mean, const double* invstd,                   \
     const Param<T>* gamma, T* dx, Param<T>* dgamma, Param<T>* dbeta, ReluGrad<T> relu),           \
    (dy, x, s, mean, invstd, gamma, dx, dgamma, dbeta, relu))

// ---- memory passes (kernels/memory.cpp)
// -----------------------------------------------------------
//
// memory_pass: the passes a kernel's time is measured against (the benchmarks' bandwidth bound),
// over n values on the kernels' own threads (threads_for(n)) and store policy (streaming stores
// for an output past the caches, detail::stream_output): copy (dst = src), read (returns the
// bytes' sum, so that nothing is skipped), write (dst = 0).
#define BNKERNEL_MEMORY_KERNELS(X, T) \
  X(double, memory_pass, (MemoryPass kind, const T* src, T* dst, int64_t n), (kind, src, dst, n))

// Every kernel, all directions.
#define BNKERNEL_KERNELS(X, T) \
  BNKERNEL_STATS_KERNELS(X, T) \
  BNKERNEL_FORWARD_KERNELS(X, T) BNKERNEL_BACKWARD_KERNELS(X, T) BNKERNEL_MEMORY_KERNELS(X, T)

// F(arg, T) for each data type T the kernels are made for.
#define BNKERNEL_FOR_EACH_DTYPE(F, arg) \
  F(arg, float) F(arg, double) F(arg, float16) F(arg, bfloat16)

// `template <typename T> ret name(params);` for each kernel of LIST, in the current namespace.
#define BNKERNEL_DECLARE_KERNEL(ret, name, params, args) \
  template <typename T>                                  \
  ret name params;
#define BNKERNEL_DECLARE(LIST) LIST(BNKERNEL_DECLARE_KERNEL, T)

// The explicit instantiations of LIST's kernels (defined in this translation unit and namespace)
// for every data type.
#define BNKERNEL_INSTANTIATE_KERNEL(ret, name, params, args) template ret name params;
#define BNKERNEL_INSTANTIATE_LIST(LIST, T) LIST(BNKERNEL_INSTANTIATE_KERNEL, T)
#define BNKERNEL_INSTANTIATE(LIST) BNKERNEL_FOR_EACH_DTYPE(BNKERNEL_INSTANTIATE_LIST, LIST)
