// The CUDA kernels' host interface (csrc/cuda/kernels.cu), in plain C++ types, so that the Python
// bindings (csrc/cuda/bindings.cpp) are compiled by the host compiler without CUDA's headers.
// Device arrays are passed as addresses (what __cuda_array_interface__ and DLPack give; 0 for an
// optional array that is absent), a stream as its handle (0: the legacy default stream); no
// function here synchronizes the device.  Every value is computed in double and rounded once.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace bnkernel::cuda {

struct Device {
  int index = 0;
  std::string name;
  int major = 0;  // compute capability
  int minor = 0;
  int64_t memory = 0;  // bytes
  int multiprocessors = 0;
};

struct Info {
  int runtime_version = 0;  // the CUDA runtime linked in (statically), e.g. 13000
  int driver_version = 0;   // the driver's, 0 where there is none
  std::string error;        // why no device can be used, or empty
  std::vector<Device> devices;
};

// The runtime, the driver and the devices; never throws (error says what is missing).
Info info();

// A CUDA error: "what: cudaErrorName: description" (RuntimeError in Python).
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Data dtypes.  Parameters (gamma, beta, running statistics, dgamma, dbeta) have the data's dtype,
// float32 for the 16-bit ones; saved statistics (mean, invstd, M2, the sums) are float64.
enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Where a launch goes: a stream handle, on a device (-1: the calling thread's current device;
// otherwise it is made current first, as the caller's array library would).
struct Launch {
  uintptr_t stream = 0;
  int device = -1;
};

// The (outer, C, inner) view every layout maps to (C-contiguous): NCHW is (N, C, H*W),
// channels-last (N*H*W, C, 1).  A mask is (outer, inner) bytes, nonzero where valid.
struct Shape {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
};

// Per-channel statistics over outer x inner values each (only the valid ones with a mask): mean
// and M2 (the sum of squared deviations), float64, written to device arrays of C.  Deterministic:
// each channel's values are cut into a number of parts that depends on the shape alone, each part
// reduced by one block of kStatsThreads threads in a fixed tree (Welford per thread, Chan's merge
// up the tree), then the parts merged in order; no atomics, so the bits are the same from run to
// run and on any GPU.  `workspace` holds 3 * channels * stats_parts(shape) doubles.
int64_t stats_parts(Shape s);
void channel_stats(DType dt, uintptr_t x, Shape s, uintptr_t mask, uintptr_t mean, uintptr_t m2,
                   uintptr_t workspace, Launch l);

// From merged statistics of `count` values a channel: invstd = 1 / sqrt(M2 / count + eps) (when
// invstd is not 0), and the running update (running_mean / running_var, parameter dtype `pt`,
// each optional), as the CPU kernels do it:
//   running = (1 - momentum) running + momentum batch, the batch variance M2 / (count - 1) when
//   unbiased and count > 1, else M2 / count.
void finish_stats(DType pt, int64_t channels, int64_t count, uintptr_t mean, uintptr_t m2,
                  double eps, uintptr_t invstd, uintptr_t running_mean, uintptr_t running_var,
                  double momentum, bool unbiased, Launch l);

// Inference's statistics: mean = running_mean and invstd = 1 / sqrt(running_var + eps), float64,
// from running statistics of dtype `pt`.
void running_coefficients(DType pt, int64_t channels, uintptr_t running_mean, uintptr_t running_var,
                          double eps, uintptr_t mean, uintptr_t invstd, Launch l);

// The backward's per-channel sums, float64 device arrays of C: sum_dy = sum(g) and
// sum_dy_xhat = sum(g (x - mean)) invstd, with g = dy, or dy where y > 0 when y is given (the
// fused ReLU's mask; g is then written to dresidual when that is given).  With a mask, a padded
// position whose x or dy is not finite enters no sum.  dgamma = sum_dy_xhat and dbeta = sum_dy
// are also written in the parameter dtype when given.  Deterministic as channel_stats (the same
// parts; `workspace` holds 2 * channels * stats_parts(shape) doubles).
void channel_sums(DType dt, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd,
                  uintptr_t y, uintptr_t mask, uintptr_t sum_dy, uintptr_t sum_dy_xhat,
                  uintptr_t dresidual, uintptr_t dgamma, uintptr_t dbeta, uintptr_t workspace,
                  Launch l);

// dx, with g = gamma or 1, dy ReLU-masked by y when given, and `count` values a channel:
//   training: dx = g invstd (dy - valid (sum_dy / count + xhat sum_dy_xhat / count)),
//             valid = 1, or the mask's value at the position
//   frozen:   dx = g invstd dy            (x, mean, the sums and the mask unused)
void backward_dx(DType dt, bool training, uintptr_t dy, uintptr_t x, Shape s, int64_t count,
                 uintptr_t mean, uintptr_t invstd, uintptr_t gamma, uintptr_t sum_dy,
                 uintptr_t sum_dy_xhat, uintptr_t y, uintptr_t mask, uintptr_t dx, Launch l);

// y = (x - mean[c]) * (gamma[c] * invstd[c]) + beta[c] (+ residual) (then max(., 0) with relu,
// NaN kept); mean and invstd float64, gamma and beta of the parameter dtype or 0 (1 and 0),
// residual of x's dtype or 0.  y may be x itself (each value is read before it is written).
void normalize(DType dt, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
               uintptr_t beta, uintptr_t residual, bool relu, uintptr_t y, Launch l);

}  // namespace bnkernel::cuda
