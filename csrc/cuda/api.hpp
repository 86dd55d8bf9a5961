// The CUDA kernels' host interface (csrc/cuda/kernels.cu), in plain C++ types, so that the Python
// bindings (csrc/cuda/bindings.cpp) are compiled by the host compiler without CUDA's headers.
// Device arrays are passed as addresses (what __cuda_array_interface__ and DLPack give), a stream
// as its handle (0: the legacy default stream); no function here synchronizes the device.
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

// Data dtypes of the kernels: float32 and float64 data, with parameters of the same dtype.
enum class DType { kFloat32, kFloat64 };

// The (outer, C, inner) view every layout maps to (C-contiguous): NCHW is (N, C, H*W),
// channels-last (N*H*W, C, 1).
struct Shape {
  int64_t outer = 0;
  int64_t channels = 0;
  int64_t inner = 0;
};

// Per-channel statistics over outer x inner values each: mean and M2 (the sum of squared
// deviations), float64, written to device arrays of C.  Deterministic: each channel's values are
// cut into a number of parts that depends on the shape alone, each part reduced by one block of
// kStatsThreads threads in a fixed tree (Welford per thread, Chan's merge up the tree), then the
// parts merged in order; no atomics, so the bits are the same from run to run and on any GPU.
// `workspace` holds 3 * channels * stats_parts(shape) doubles (device memory).
int64_t stats_parts(Shape s);
void channel_stats(DType dt, uintptr_t x, Shape s, uintptr_t mean, uintptr_t m2,
                   uintptr_t workspace, uintptr_t stream);

// The backward's per-channel sums, float64 device arrays of C: sum_dy = sum(dy) and
// sum_dy_xmu = sum(dy * (x - mean)), deterministic as channel_stats (the same parts; `workspace`
// holds 2 * channels * stats_parts(shape) doubles).
void channel_sums(DType dt, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t sum_dy,
                  uintptr_t sum_dy_xmu, uintptr_t workspace, uintptr_t stream);

// dx, in double and rounded once, with m = outer * inner values a channel and g = gamma or 1:
//   training: dx = g invstd (dy - sum_dy / m - (x - mean) invstd^2 sum_dy_xmu / m)
//   frozen:   dx = g invstd dy            (x, mean, sum_dy and sum_dy_xmu unused, may be 0)
void backward_dx(DType dt, bool training, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean,
                 uintptr_t invstd, uintptr_t gamma, uintptr_t sum_dy, uintptr_t sum_dy_xmu,
                 uintptr_t dx, uintptr_t stream);

// y = (x - mean[c]) * (gamma[c] * invstd[c]) + beta[c], computed in double and rounded once;
// mean and invstd float64 device arrays, gamma and beta of the data's dtype or 0 (1 and 0).
void normalize(DType dt, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
               uintptr_t beta, uintptr_t y, uintptr_t stream);

}  // namespace bnkernel::cuda
