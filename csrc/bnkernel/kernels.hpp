// The public C++ API: the kernels on plain pointers, their argument types, thread and ISA controls.
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

#include "bnkernel/half.hpp"
#include "bnkernel/kernel_list.hpp"

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

// What the forward applies after the affine map, in the same pass and in double before the one
// rounding to T:  y = relu(bn(x) + residual).  Either part may be absent.
template <typename T>
struct Epilogue {
  const T* residual = nullptr;  // x's shape
  bool relu = false;
};

// The backward of a forward with a ReLU epilogue, from the forward's output y rather than the
// pre-activation: the gradient reaching batch normalization is g = (y > 0 ? dy : 0).  g is also
// the residual's gradient; backward_reduce / the fused backwards write it to dresidual when given.
// With y null, g = dy (and dresidual must be null).
template <typename T>
struct ReluGrad {
  const T* y = nullptr;
  T* dresidual = nullptr;
};

// What memory_pass does (see kernel_list.hpp).
enum class MemoryPass { copy, read, write };

// The kernels (kernel_list.hpp), each forwarding to the copy compiled for the best instruction set
// this CPU supports (see dispatch/isa.hpp).
BNKERNEL_DECLARE(BNKERNEL_KERNELS)

// Chan et al.'s pairwise merge of `parts` partial statistics, applied left to right:
//   n = nA + nB;  d = meanB - meanA
//   mean = meanA + d * nB / n;  M2 = M2A + M2B + d^2 * nA * nB / n
// means and m2s are (parts, channels) row-major.  Parts with a count of 0 are neutral.  counts are
// >= 0; a total that does not fit in int64 throws std::overflow_error, the outputs untouched.
void merge_stats(int64_t parts, int64_t channels, const int64_t* counts, const double* means,
                 const double* m2s, int64_t* count, double* mean, double* m2);

// The running update of `running` from the batch statistics of `count` values per channel (mean and
// M2 = sum((x - mean)^2), as channel_stats and merge_stats give them), in double and rounded once
// to T (float or double).  forward_train applies it; the split phases reach it through the
// bindings, so every path updates with the same operations.
template <typename T>
void update_running_stats(RunningUpdate<T> running, int64_t channels, int64_t count,
                          const double* mean, const double* m2);

// ---- threads and dispatch -----------------------------------------------------------------------

// The most threads a kernel runs on (see runtime/threads.cpp): an OpenMP setting above it is
// clamped to it, and set_num_threads clamps too (the bindings refuse more).
constexpr int kMaxThreads = 256;

// 0 means "follow OpenMP" (OMP_NUM_THREADS, threadpoolctl limits); n > 0 pins the count.
// get_num_threads() is the count the kernels use: at most kMaxThreads, and 1 in a process forked
// from this one (libgomp's threads do not survive fork; see runtime/threads.cpp).
void set_num_threads(int n);
int get_num_threads();
bool have_openmp();

// The instruction set the kernels run with: "avx512", "avx2" or "baseline" (chosen at import from
// what the CPU supports; BNKERNEL_ISA=<name> in the environment asks for a lower one).
const char* isa_name();

}  // namespace bnkernel
