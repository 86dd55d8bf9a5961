// The CUDA kernels (see api.hpp): per-channel statistics and the normalize, on the (outer, C,
// inner) view, float32 and float64, every value computed in double and rounded once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/api.hpp"

namespace bnkernel::cuda {
namespace {

constexpr int kStatsThreads = 256;  // a statistics block (the tree's width: fixed, for the bits)
constexpr int64_t kPartValues = 1 << 16;  // values a part covers at least, past one part
constexpr int64_t kMaxParts = 1024;
constexpr int kElementwiseThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}

cudaStream_t as_stream(uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// (count, mean, M2) of a set of values; merged with Chan's formula
struct Moments {
  double n;
  double mean;
  double m2;
};

__device__ inline void add(Moments& a, double x) {
  a.n += 1.0;
  const double d = x - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (x - a.mean);
}

__device__ inline Moments merge(Moments a, Moments b) {
  if (b.n == 0.0) return a;
  if (a.n == 0.0) return b;
  const double n = a.n + b.n;
  const double d = b.mean - a.mean;
  return Moments{n, a.mean + d * (b.n / n), a.m2 + b.m2 + d * d * (a.n * (b.n / n))};
}

// The part of a channel's m values that block blockIdx.x reduces (the statistics' and the sums'
// launch: one block per (channel, part)): values [begin, end) of channel c, part p.
struct Part {
  int64_t c, p, begin, end;
};
__device__ inline Part block_part(int64_t m, int64_t parts) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) / parts;
  const int64_t p = static_cast<int64_t>(blockIdx.x) % parts;
  const int64_t len = (m + parts - 1) / parts;
  return Part{c, p, p * len, min(m, (p + 1) * len)};
}
// the address of channel c's j-th value (j = o * inner + i) in the (outer, C, inner) view
__device__ inline int64_t value_at(int64_t j, int64_t c, int64_t C, int64_t inner) {
  const int64_t o = j / inner;
  return (o * C + c) * inner + (j - o * inner);
}

// One block per (channel, part): thread t takes every kStatsThreads-th value from begin + t, then
// the block's tree in shared memory.
template <typename T>
__global__ void part_moments(const T* __restrict__ x, int64_t C, int64_t inner, int64_t m,
                             int64_t parts, double* __restrict__ out) {
  __shared__ Moments tree[kStatsThreads];
  const Part q = block_part(m, parts);
  Moments a{0.0, 0.0, 0.0};
  for (int64_t j = q.begin + threadIdx.x; j < q.end; j += kStatsThreads) {
    add(a, static_cast<double>(x[value_at(j, q.c, C, inner)]));
  }
  tree[threadIdx.x] = a;
  __syncthreads();
  for (int stride = kStatsThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) {
      tree[threadIdx.x] = merge(tree[threadIdx.x], tree[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double* o = out + 3 * (q.c * parts + q.p);
    o[0] = tree[0].n;
    o[1] = tree[0].mean;
    o[2] = tree[0].m2;
  }
}

// One thread per channel: its parts merged in order.
__global__ void merge_parts(const double* __restrict__ partial, int64_t C, int64_t parts,
                            double* __restrict__ mean, double* __restrict__ m2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Moments a{0.0, 0.0, 0.0};
  for (int64_t p = 0; p < parts; ++p) {
    const double* q = partial + 3 * (c * parts + p);
    a = merge(a, Moments{q[0], q[1], q[2]});
  }
  mean[c] = a.mean;
  m2[c] = a.m2;
}

// The backward's sums, as part_moments: one block per (channel, part), a fixed tree.
template <typename T>
__global__ void part_sums(const T* __restrict__ dy, const T* __restrict__ x,
                          const double* __restrict__ mean, int64_t C, int64_t inner, int64_t m,
                          int64_t parts, double* __restrict__ out) {
  __shared__ double tree_dy[kStatsThreads];
  __shared__ double tree_xmu[kStatsThreads];
  const Part q = block_part(m, parts);
  const double mu = mean[q.c];
  double s_dy = 0.0, s_xmu = 0.0;
  for (int64_t j = q.begin + threadIdx.x; j < q.end; j += kStatsThreads) {
    const int64_t e = value_at(j, q.c, C, inner);
    const double g = static_cast<double>(dy[e]);
    s_dy += g;
    s_xmu += g * (static_cast<double>(x[e]) - mu);
  }
  tree_dy[threadIdx.x] = s_dy;
  tree_xmu[threadIdx.x] = s_xmu;
  __syncthreads();
  for (int stride = kStatsThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) {
      tree_dy[threadIdx.x] += tree_dy[threadIdx.x + stride];
      tree_xmu[threadIdx.x] += tree_xmu[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[2 * (q.c * parts + q.p)] = tree_dy[0];
    out[2 * (q.c * parts + q.p) + 1] = tree_xmu[0];
  }
}

__global__ void merge_sums(const double* __restrict__ partial, int64_t C, int64_t parts,
                           double* __restrict__ sum_dy, double* __restrict__ sum_dy_xmu) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a = 0.0, b = 0.0;
  for (int64_t p = 0; p < parts; ++p) {
    a += partial[2 * (c * parts + p)];
    b += partial[2 * (c * parts + p) + 1];
  }
  sum_dy[c] = a;
  sum_dy_xmu[c] = b;
}

template <typename T, bool Training>
__global__ void dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t total,
                          int64_t C, int64_t inner, double m, const double* __restrict__ mean,
                          const double* __restrict__ invstd, const T* __restrict__ gamma,
                          const double* __restrict__ sum_dy, const double* __restrict__ sum_dy_xmu,
                          T* __restrict__ dx) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const int64_t c = (e / inner) % C;
    const double k_scale = (gamma ? static_cast<double>(gamma[c]) : 1.0) * invstd[c];
    const double g = static_cast<double>(dy[e]);
    if constexpr (Training) {
      const double k_dy = sum_dy[c] / m;
      const double k_x = invstd[c] * (invstd[c] * sum_dy_xmu[c]) / m;
      const double d = static_cast<double>(x[e]) - mean[c];
      dx[e] = static_cast<T>(k_scale * fma(-d, k_x, g - k_dy));
    } else {
      dx[e] = static_cast<T>(g * k_scale);
    }
  }
}

template <typename T>
__global__ void normalize_kernel(const T* __restrict__ x, int64_t total, int64_t C, int64_t inner,
                                 const double* __restrict__ mean, const double* __restrict__ invstd,
                                 const T* __restrict__ gamma, const T* __restrict__ beta,
                                 T* __restrict__ y) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += step) {
    const int64_t c = (e / inner) % C;
    const double g = gamma ? static_cast<double>(gamma[c]) : 1.0;
    const double b = beta ? static_cast<double>(beta[c]) : 0.0;
    y[e] = static_cast<T>(fma(static_cast<double>(x[e]) - mean[c], g * invstd[c], b));
  }
}

// The blocks of a (channel, part) launch, refused past one launch's grid
int64_t part_blocks(Shape s, int64_t parts, const char* what) {
  const int64_t blocks = s.channels * parts;
  if (blocks > INT32_MAX) throw Error(std::string(what) + ": too many channels for one launch");
  return blocks;
}

// The blocks of a grid-stride elementwise launch over total values
unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(
      std::min<int64_t>(ceil_div(total, kElementwiseThreads), int64_t{1} << 20));
}

// f(T{}) for the data dtype dt
template <class F>
void with_dtype(DType dt, F&& f) {
  if (dt == DType::kFloat32) {
    f(float{});
  } else {
    f(double{});
  }
}

template <typename T>
void stats_impl(uintptr_t x, Shape s, uintptr_t mean, uintptr_t m2, uintptr_t workspace,
                uintptr_t stream) {
  const int64_t C = s.channels;
  const int64_t m = s.outer * s.inner;
  if (C == 0) return;
  const int64_t parts = stats_parts(s);
  const int64_t blocks = part_blocks(s, parts, "channel_stats");
  auto* partial = reinterpret_cast<double*>(workspace);
  part_moments<T><<<static_cast<unsigned>(blocks), kStatsThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const T*>(x), C, std::max<int64_t>(s.inner, 1), m, parts, partial);
  check(cudaGetLastError(), "channel_stats");
  merge_parts<<<static_cast<unsigned>(ceil_div(C, 256)), 256, 0, as_stream(stream)>>>(
      partial, C, parts, reinterpret_cast<double*>(mean), reinterpret_cast<double*>(m2));
  check(cudaGetLastError(), "channel_stats");
}

template <typename T>
void normalize_impl(uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
                    uintptr_t beta, uintptr_t y, uintptr_t stream) {
  const int64_t total = s.outer * s.channels * s.inner;
  if (total == 0) return;
  const unsigned blocks = elementwise_blocks(total);
  normalize_kernel<T><<<blocks, kElementwiseThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const T*>(x), total, s.channels, std::max<int64_t>(s.inner, 1),
      reinterpret_cast<const double*>(mean), reinterpret_cast<const double*>(invstd),
      reinterpret_cast<const T*>(gamma), reinterpret_cast<const T*>(beta), reinterpret_cast<T*>(y));
  check(cudaGetLastError(), "normalize");
}

template <typename T>
void sums_impl(uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t sum_dy,
               uintptr_t sum_dy_xmu, uintptr_t workspace, uintptr_t stream) {
  const int64_t C = s.channels;
  if (C == 0) return;
  const int64_t parts = stats_parts(s);
  const int64_t blocks = part_blocks(s, parts, "channel_sums");
  auto* partial = reinterpret_cast<double*>(workspace);
  part_sums<T><<<static_cast<unsigned>(blocks), kStatsThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x),
      reinterpret_cast<const double*>(mean), C, std::max<int64_t>(s.inner, 1), s.outer * s.inner,
      parts, partial);
  check(cudaGetLastError(), "channel_sums");
  merge_sums<<<static_cast<unsigned>(ceil_div(C, 256)), 256, 0, as_stream(stream)>>>(
      partial, C, parts, reinterpret_cast<double*>(sum_dy), reinterpret_cast<double*>(sum_dy_xmu));
  check(cudaGetLastError(), "channel_sums");
}

template <typename T>
void dx_impl(bool training, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd,
             uintptr_t gamma, uintptr_t sum_dy, uintptr_t sum_dy_xmu, uintptr_t dx,
             uintptr_t stream) {
  const int64_t total = s.outer * s.channels * s.inner;
  if (total == 0) return;
  const unsigned blocks = elementwise_blocks(total);
  const auto m = static_cast<double>(s.outer * s.inner);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kElementwiseThreads, 0, as_stream(stream)>>>(
        reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x), total, s.channels,
        std::max<int64_t>(s.inner, 1), m, reinterpret_cast<const double*>(mean),
        reinterpret_cast<const double*>(invstd), reinterpret_cast<const T*>(gamma),
        reinterpret_cast<const double*>(sum_dy), reinterpret_cast<const double*>(sum_dy_xmu),
        reinterpret_cast<T*>(dx));
  };
  if (training) {
    launch(dx_kernel<T, true>);
  } else {
    launch(dx_kernel<T, false>);
  }
  check(cudaGetLastError(), "backward_dx");
}

}  // namespace

Info info() {
  Info r;
  cudaRuntimeGetVersion(&r.runtime_version);
  if (cudaDriverGetVersion(&r.driver_version) != cudaSuccess) r.driver_version = 0;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    r.error = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
    cudaGetLastError();  // (clears it)
    return r;
  }
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, d) != cudaSuccess) continue;
    r.devices.push_back(Device{d, p.name, p.major, p.minor, static_cast<int64_t>(p.totalGlobalMem),
                               p.multiProcessorCount});
  }
  if (count == 0) r.error = "no CUDA device";
  return r;
}

int64_t stats_parts(Shape s) {
  const int64_t m = s.outer * s.inner;
  return std::clamp<int64_t>(ceil_div(m, kPartValues), 1, kMaxParts);
}

void channel_stats(DType dt, uintptr_t x, Shape s, uintptr_t mean, uintptr_t m2,
                   uintptr_t workspace, uintptr_t stream) {
  with_dtype(dt, [&](auto t) { stats_impl<decltype(t)>(x, s, mean, m2, workspace, stream); });
}

void normalize(DType dt, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
               uintptr_t beta, uintptr_t y, uintptr_t stream) {
  with_dtype(
      dt, [&](auto t) { normalize_impl<decltype(t)>(x, s, mean, invstd, gamma, beta, y, stream); });
}

void channel_sums(DType dt, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t sum_dy,
                  uintptr_t sum_dy_xmu, uintptr_t workspace, uintptr_t stream) {
  with_dtype(dt, [&](auto t) {
    sums_impl<decltype(t)>(dy, x, s, mean, sum_dy, sum_dy_xmu, workspace, stream);
  });
}

void backward_dx(DType dt, bool training, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean,
                 uintptr_t invstd, uintptr_t gamma, uintptr_t sum_dy, uintptr_t sum_dy_xmu,
                 uintptr_t dx, uintptr_t stream) {
  with_dtype(dt, [&](auto t) {
    dx_impl<decltype(t)>(training, dy, x, s, mean, invstd, gamma, sum_dy, sum_dy_xmu, dx, stream);
  });
}

}  // namespace bnkernel::cuda
