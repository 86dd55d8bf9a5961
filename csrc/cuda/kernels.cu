// The CUDA kernels (see api.hpp): per-channel statistics, the backward's sums, the normalize and
// dx, on the (outer, C, inner) view; float32, float64, float16 and bfloat16 data, every value
// computed in double and rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "cuda/api.hpp"
#include "cuda/geometry.hpp"

namespace bnkernel::cuda {
namespace {

constexpr int kStatsThreads = 256;  // a statistics block (the tree's width: fixed, for the bits)
// A reduction cuts each channel (or tile of channels) into parts, one block each, so that a launch
// has about kTargetBlocks blocks (enough to keep a GPU's memory busy), each part at least
// kMinPartValues values (rows for channels-last), at most kMaxParts: from the shape alone, so
// that the bits do not depend on the GPU.
constexpr int64_t kTargetBlocks = 2048;
constexpr int64_t kMinPartValues = 4096;
constexpr int64_t kMaxParts = 1024;
constexpr int kElementwiseThreads = 256;
constexpr int kChannelThreads = 256;  // the per-channel kernels (merges, finishes)

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw Error(std::string(what) + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}

cudaStream_t as_stream(uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// Makes l.device current (as the caller's array library has it when l.device is -1).
void enter(const Launch& l, const char* what) {
  if (l.device < 0) return;
  int current = -1;
  check(cudaGetDevice(&current), what);
  if (current != l.device) check(cudaSetDevice(l.device), what);
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T>
const T* in(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}
template <typename T>
T* out(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// ---- values: loaded as double, stored rounded once -------------------------------------------

__device__ inline double load(float v) {
  return static_cast<double>(v);
}
__device__ inline double load(double v) {
  return v;
}
__device__ inline double load(__half v) {
  return static_cast<double>(__half2float(v));
}
__device__ inline double load(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

template <typename T>
__device__ inline T round_to(double v);
template <>
__device__ inline float round_to<float>(double v) {
  return static_cast<float>(v);
}
template <>
__device__ inline double round_to<double>(double v) {
  return v;
}
template <>
__device__ inline __half round_to<__half>(double v) {
  return __double2half(v);  // to nearest, ties to even, from double directly
}
template <>
__device__ inline __nv_bfloat16 round_to<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}

// The parameters' type for data of type T: T, float for the 16-bit types.
template <typename T>
struct ParamOf {
  using type = T;
};
template <>
struct ParamOf<__half> {
  using type = float;
};
template <>
struct ParamOf<__nv_bfloat16> {
  using type = float;
};
template <typename T>
using Param = typename ParamOf<T>::type;

// max(v, 0) keeping a NaN (the CPU kernels' relu_value: -0 gives +0)
__device__ inline double relu(double v) {
  return (v > 0.0 || isnan(v)) ? v : 0.0;
}

// ---- the reductions --------------------------------------------------------------------------

// (count, mean, M2) of a set of values; merged with Chan's formula
struct Moments {
  double n;
  double mean;
  double m2;
};

__device__ inline void welford(Moments& a, double x) {
  a.n += 1.0;
  const double d = x - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (x - a.mean);
}

__device__ inline Moments chan_merge(Moments a, Moments b) {
  if (b.n == 0.0) return a;
  if (a.n == 0.0) return b;
  const double n = a.n + b.n;
  const double d = b.mean - a.mean;
  return Moments{n, a.mean + d * (b.n / n), a.m2 + b.m2 + d * d * (a.n * (b.n / n))};
}

// What the two reductions add up.  Each op gives a thread's zero state, what one value adds
// (e: its address in x, j: its index in the channel and in the mask, ctx: the channel's
// constants), the merge, and how a part's result is stored in the workspace.
template <typename T>
struct MomentsOp {
  const T* x;
  const uint8_t* mask;
  using State = Moments;
  struct Ctx {};
  __device__ static State zero() { return Moments{0.0, 0.0, 0.0}; }
  __device__ Ctx channel(int64_t) const { return Ctx{}; }
  __device__ void add(State& s, const Ctx&, int64_t e, int64_t j) const {
    if (mask != nullptr && mask[j] == 0) return;
    welford(s, load(x[e]));
  }
  __device__ static State merge(State a, State b) { return chan_merge(a, b); }
  __device__ static void store(double* partial, int64_t slot, const State& s) {
    partial[3 * slot] = s.n;
    partial[3 * slot + 1] = s.mean;
    partial[3 * slot + 2] = s.m2;
  }
};

struct Sums {
  double dy;
  double xmu;
};

template <typename T>
struct SumsOp {
  const T* dy;
  const T* x;
  const T* y;  // the fused ReLU's output, or null
  const uint8_t* mask;
  const double* mean;
  T* dresidual;  // receives g (with y), or null
  using State = Sums;
  using Ctx = double;  // the channel's mean
  __device__ static State zero() { return Sums{0.0, 0.0}; }
  __device__ Ctx channel(int64_t c) const { return mean[c]; }
  __device__ void add(State& s, const Ctx& mu, int64_t e, int64_t j) const {
    const double raw = load(dy[e]);
    double g = raw;
    if (y != nullptr) {
      if (!(load(y[e]) > 0.0)) g = 0.0;
      if (dresidual != nullptr) dresidual[e] = round_to<T>(g);
    }
    const double v = load(x[e]);
    // padding that is not finite (NaN or inf) enters no sum
    if (mask != nullptr && mask[j] == 0 && !(isfinite(v) && isfinite(raw))) return;
    s.dy += g;
    s.xmu += g * (v - mu);
  }
  __device__ static State merge(State a, State b) { return Sums{a.dy + b.dy, a.xmu + b.xmu}; }
  __device__ static void store(double* partial, int64_t slot, const State& s) {
    partial[2 * slot] = s.dy;
    partial[2 * slot + 1] = s.xmu;
  }
};

// Planar layouts (inner > 1): one block per (channel, part), thread t taking the part's values
// begin + t, begin + t + kStatsThreads, ... (consecutive threads, consecutive addresses within a
// row), then the block's fixed tree in shared memory.
template <class Op>
__global__ void reduce_planar(Op op, int64_t C, int64_t inner, int64_t m, int64_t parts,
                              double* __restrict__ partial) {
  __shared__ typename Op::State tree[kStatsThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) / parts;
  const int64_t p = static_cast<int64_t>(blockIdx.x) % parts;
  const Range r = part_range(m, parts, p);
  typename Op::State s = Op::zero();
  const int64_t j0 = r.begin + threadIdx.x;
  if (j0 < r.end) {
    const auto ctx = op.channel(c);
    for (ValueCursor v(j0, kStatsThreads, inner); v.j < r.end; v.advance()) {
      op.add(s, ctx, v.address(c, C), v.j);
    }
  }
  tree[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kStatsThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) {
      tree[threadIdx.x] = Op::merge(tree[threadIdx.x], tree[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) Op::store(partial, c * parts + p, tree[0]);
}

// Channels-last (inner == 1): one block per (tile of channels, part of the rows), kRowWarps warps
// reading rows with lanes across the tile's channels (coalesced); per channel, a fixed tree over
// the warps, then the rows side by side in a warp merged in order (see row_tiles).
template <class Op>
__global__ void reduce_rows(Op op, int64_t C, int64_t outer, int64_t parts, RowTiles t,
                            double* __restrict__ partial) {
  __shared__ typename Op::State tree[kRowWarps][32];
  const int64_t tile = static_cast<int64_t>(blockIdx.x) / parts;
  const int64_t p = static_cast<int64_t>(blockIdx.x) % parts;
  const Range r = part_range(outer, parts, p);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int w = static_cast<int>(threadIdx.x) / 32;
  const Lane l = lane_of(t, lane);
  const int64_t c = tile * t.width + l.channel;
  const bool mine = l.active && c < C;
  typename Op::State s = Op::zero();
  if (mine) {
    const auto ctx = op.channel(c);
    const int64_t stride = int64_t{kRowWarps} * t.rows_per_warp;
    for (int64_t o = r.begin + int64_t{w} * t.rows_per_warp + l.row; o < r.end; o += stride) {
      op.add(s, ctx, o * C + c, o);
    }
  }
  tree[w][lane] = s;
  __syncthreads();
  for (int stride = kRowWarps / 2; stride > 0; stride /= 2) {
    if (w < stride) tree[w][lane] = Op::merge(tree[w][lane], tree[w + stride][lane]);
    __syncthreads();
  }
  if (w == 0 && mine && l.row == 0) {
    typename Op::State a = tree[0][lane];
    for (int k = 1; k < t.rows_per_warp; ++k) a = Op::merge(a, tree[0][lane + k * t.width]);
    Op::store(partial, c * parts + p, a);
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
    a = chan_merge(a, Moments{q[0], q[1], q[2]});
  }
  mean[c] = a.mean;
  m2[c] = a.m2;
}

template <typename P>
__global__ void merge_sums(const double* __restrict__ partial, int64_t C, int64_t parts,
                           const double* __restrict__ invstd, double* __restrict__ sum_dy,
                           double* __restrict__ sum_dy_xhat, P* __restrict__ dgamma,
                           P* __restrict__ dbeta) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a = 0.0, b = 0.0;
  for (int64_t p = 0; p < parts; ++p) {
    a += partial[2 * (c * parts + p)];
    b += partial[2 * (c * parts + p) + 1];
  }
  b *= invstd[c];
  sum_dy[c] = a;
  sum_dy_xhat[c] = b;
  if (dgamma != nullptr) dgamma[c] = round_to<P>(b);
  if (dbeta != nullptr) dbeta[c] = round_to<P>(a);
}

// ---- the per-channel finishes ----------------------------------------------------------------

template <typename P>
__global__ void finish_kernel(int64_t C, double count, const double* __restrict__ mean,
                              const double* __restrict__ m2, double eps,
                              double* __restrict__ invstd, P* __restrict__ rm, P* __restrict__ rv,
                              double momentum, double denom) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  if (invstd != nullptr) invstd[c] = 1.0 / sqrt(m2[c] / count + eps);
  const double keep = 1.0 - momentum;
  if (rm != nullptr) rm[c] = round_to<P>(keep * load(rm[c]) + momentum * mean[c]);
  if (rv != nullptr) rv[c] = round_to<P>(keep * load(rv[c]) + momentum * (m2[c] / denom));
}

template <typename P>
__global__ void running_kernel(int64_t C, const P* __restrict__ rm, const P* __restrict__ rv,
                               double eps, double* __restrict__ mean, double* __restrict__ invstd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  mean[c] = load(rm[c]);
  invstd[c] = 1.0 / sqrt(load(rv[c]) + eps);
}

// ---- the elementwise passes ------------------------------------------------------------------

template <typename T, bool Training>
__global__ void dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                          const T* __restrict__ y, const uint8_t* __restrict__ mask, int64_t total,
                          int64_t C, int64_t inner, double count, const double* __restrict__ mean,
                          const double* __restrict__ invstd, const Param<T>* __restrict__ gamma,
                          const double* __restrict__ sum_dy, const double* __restrict__ sum_dy_xhat,
                          T* __restrict__ dx) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (start >= total) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (ChannelCursor k(start, step, C, inner); k.e < total; k.advance()) {
    const int64_t e = k.e;
    const int64_t c = k.c;
    const double k_scale = (gamma ? load(gamma[c]) : 1.0) * invstd[c];
    double g = load(dy[e]);
    if (y != nullptr && !(load(y[e]) > 0.0)) g = 0.0;
    if constexpr (Training) {
      const bool valid = mask == nullptr || mask[k.position()] != 0;
      if (valid) {
        const double k_dy = sum_dy[c] / count;
        const double k_x = invstd[c] * sum_dy_xhat[c] / count;
        const double d = load(x[e]) - mean[c];
        g = fma(-d, k_x, g - k_dy);
      }
    }
    dx[e] = round_to<T>(k_scale * g);
  }
}

// (x and y may be the same array, and the residual x too: no __restrict__ on them)
template <typename T>
__global__ void normalize_kernel(const T* x, int64_t total, int64_t C, int64_t inner,
                                 const double* __restrict__ mean, const double* __restrict__ invstd,
                                 const Param<T>* __restrict__ gamma,
                                 const Param<T>* __restrict__ beta, const T* residual, bool relu_on,
                                 T* y) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (start >= total) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (ChannelCursor k(start, step, C, inner); k.e < total; k.advance()) {
    const int64_t e = k.e;
    const int64_t c = k.c;
    const double g = gamma ? load(gamma[c]) : 1.0;
    const double b = beta ? load(beta[c]) : 0.0;
    double v = fma(load(x[e]) - mean[c], g * invstd[c], b);
    if (residual != nullptr) v += load(residual[e]);
    if (relu_on) v = relu(v);
    y[e] = round_to<T>(v);
  }
}

// ---- launches --------------------------------------------------------------------------------

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

unsigned channel_blocks(int64_t C) {
  return static_cast<unsigned>(ceil_div(C, kChannelThreads));
}

// f(T{}) for the data dtype dt
template <class F>
void with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat64:
      f(double{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
  }
}

// f(P{}) for the parameter dtype pt (float32 or float64)
template <class F>
void with_param_dtype(DType pt, F&& f) {
  if (pt == DType::kFloat64) {
    f(double{});
  } else if (pt == DType::kFloat32) {
    f(float{});
  } else {
    throw Error("parameters are float32 or float64");
  }
}

// A reduction's launch: the row-tile kernel for channels-last (inner <= 1), the planar one
// otherwise; each writes one partial per (channel, part) at slot c * parts + p.
template <class Op>
void launch_reduction(const Op& op, Shape s, int64_t parts, double* partial, const Launch& l,
                      const char* what) {
  if (s.inner <= 1) {
    const RowTiles t = row_tiles(s.channels);
    const int64_t rows = s.inner == 0 ? 0 : s.outer;
    const int64_t blocks = t.tiles * parts;
    if (blocks > INT32_MAX) throw Error(std::string(what) + ": too many channels for one launch");
    reduce_rows<Op><<<static_cast<unsigned>(blocks), kRowWarps * 32, 0, as_stream(l.stream)>>>(
        op, s.channels, rows, parts, t, partial);
  } else {
    const int64_t blocks = part_blocks(s, parts, what);
    reduce_planar<Op><<<static_cast<unsigned>(blocks), kStatsThreads, 0, as_stream(l.stream)>>>(
        op, s.channels, s.inner, s.outer * s.inner, parts, partial);
  }
  check(cudaGetLastError(), what);
}

template <typename T>
void stats_impl(uintptr_t x, Shape s, uintptr_t mask, uintptr_t mean, uintptr_t m2,
                uintptr_t workspace, const Launch& l) {
  const int64_t C = s.channels;
  const int64_t parts = stats_parts(s);
  auto* partial = out<double>(workspace);
  launch_reduction(MomentsOp<T>{in<T>(x), in<uint8_t>(mask)}, s, parts, partial, l,
                   "channel_stats");
  merge_parts<<<channel_blocks(C), kChannelThreads, 0, as_stream(l.stream)>>>(
      partial, C, parts, out<double>(mean), out<double>(m2));
  check(cudaGetLastError(), "channel_stats");
}

template <typename T>
void sums_impl(uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t y,
               uintptr_t mask, uintptr_t sum_dy, uintptr_t sum_dy_xhat, uintptr_t dresidual,
               uintptr_t dgamma, uintptr_t dbeta, uintptr_t workspace, const Launch& l) {
  const int64_t C = s.channels;
  const int64_t parts = stats_parts(s);
  auto* partial = out<double>(workspace);
  const SumsOp<T> op{in<T>(dy),         in<T>(x),         in<T>(y),
                     in<uint8_t>(mask), in<double>(mean), out<T>(dresidual)};
  launch_reduction(op, s, parts, partial, l, "channel_sums");
  merge_sums<Param<T>><<<channel_blocks(C), kChannelThreads, 0, as_stream(l.stream)>>>(
      partial, C, parts, in<double>(invstd), out<double>(sum_dy), out<double>(sum_dy_xhat),
      out<Param<T>>(dgamma), out<Param<T>>(dbeta));
  check(cudaGetLastError(), "channel_sums");
}

template <typename T>
void dx_impl(bool training, uintptr_t dy, uintptr_t x, Shape s, int64_t count, uintptr_t mean,
             uintptr_t invstd, uintptr_t gamma, uintptr_t sum_dy, uintptr_t sum_dy_xhat,
             uintptr_t y, uintptr_t mask, uintptr_t dx, const Launch& l) {
  const int64_t total = s.outer * s.channels * s.inner;
  auto launch = [&](auto kernel) {
    kernel<<<elementwise_blocks(total), kElementwiseThreads, 0, as_stream(l.stream)>>>(
        in<T>(dy), in<T>(x), in<T>(y), in<uint8_t>(mask), total, s.channels,
        std::max<int64_t>(s.inner, 1), static_cast<double>(count), in<double>(mean),
        in<double>(invstd), in<Param<T>>(gamma), in<double>(sum_dy), in<double>(sum_dy_xhat),
        out<T>(dx));
  };
  if (training) {
    launch(dx_kernel<T, true>);
  } else {
    launch(dx_kernel<T, false>);
  }
  check(cudaGetLastError(), "backward_dx");
}

template <typename T>
void normalize_impl(uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
                    uintptr_t beta, uintptr_t residual, bool relu_on, uintptr_t y,
                    const Launch& l) {
  const int64_t total = s.outer * s.channels * s.inner;
  normalize_kernel<T><<<elementwise_blocks(total), kElementwiseThreads, 0, as_stream(l.stream)>>>(
      in<T>(x), total, s.channels, std::max<int64_t>(s.inner, 1), in<double>(mean),
      in<double>(invstd), in<Param<T>>(gamma), in<Param<T>>(beta), in<T>(residual), relu_on,
      out<T>(y));
  check(cudaGetLastError(), "normalize");
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
  const int64_t channel_blocks = s.inner <= 1 ? row_tiles(s.channels).tiles : s.channels;
  const int64_t want = ceil_div(kTargetBlocks, std::max<int64_t>(channel_blocks, 1));
  const int64_t most = std::max<int64_t>(ceil_div(m, kMinPartValues), 1);
  return std::clamp<int64_t>(std::min(want, most), 1, kMaxParts);
}

// Every entry point returns before touching a device when there is nothing to do (no channels,
// or no values for an elementwise pass), so that empty calls need no GPU.

void channel_stats(DType dt, uintptr_t x, Shape s, uintptr_t mask, uintptr_t mean, uintptr_t m2,
                   uintptr_t workspace, Launch l) {
  if (s.channels == 0) return;
  enter(l, "channel_stats");
  with_dtype(dt, [&](auto t) { stats_impl<decltype(t)>(x, s, mask, mean, m2, workspace, l); });
}

void finish_stats(DType pt, int64_t channels, int64_t count, uintptr_t mean, uintptr_t m2,
                  double eps, uintptr_t invstd, uintptr_t running_mean, uintptr_t running_var,
                  double momentum, bool unbiased, Launch l) {
  if (channels == 0) return;
  enter(l, "finish_stats");
  const auto denom = static_cast<double>(unbiased && count > 1 ? count - 1 : count);
  with_param_dtype(pt, [&](auto t) {
    using P = decltype(t);
    finish_kernel<P><<<channel_blocks(channels), kChannelThreads, 0, as_stream(l.stream)>>>(
        channels, static_cast<double>(count), in<double>(mean), in<double>(m2), eps,
        out<double>(invstd), out<P>(running_mean), out<P>(running_var), momentum, denom);
  });
  check(cudaGetLastError(), "finish_stats");
}

void running_coefficients(DType pt, int64_t channels, uintptr_t running_mean, uintptr_t running_var,
                          double eps, uintptr_t mean, uintptr_t invstd, Launch l) {
  if (channels == 0) return;
  enter(l, "running_coefficients");
  with_param_dtype(pt, [&](auto t) {
    using P = decltype(t);
    running_kernel<P><<<channel_blocks(channels), kChannelThreads, 0, as_stream(l.stream)>>>(
        channels, in<P>(running_mean), in<P>(running_var), eps, out<double>(mean),
        out<double>(invstd));
  });
  check(cudaGetLastError(), "running_coefficients");
}

void channel_sums(DType dt, uintptr_t dy, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd,
                  uintptr_t y, uintptr_t mask, uintptr_t sum_dy, uintptr_t sum_dy_xhat,
                  uintptr_t dresidual, uintptr_t dgamma, uintptr_t dbeta, uintptr_t workspace,
                  Launch l) {
  if (s.channels == 0) return;
  enter(l, "channel_sums");
  with_dtype(dt, [&](auto t) {
    sums_impl<decltype(t)>(dy, x, s, mean, invstd, y, mask, sum_dy, sum_dy_xhat, dresidual, dgamma,
                           dbeta, workspace, l);
  });
}

void backward_dx(DType dt, bool training, uintptr_t dy, uintptr_t x, Shape s, int64_t count,
                 uintptr_t mean, uintptr_t invstd, uintptr_t gamma, uintptr_t sum_dy,
                 uintptr_t sum_dy_xhat, uintptr_t y, uintptr_t mask, uintptr_t dx, Launch l) {
  if (s.outer * s.channels * s.inner == 0) return;
  enter(l, "backward_dx");
  with_dtype(dt, [&](auto t) {
    dx_impl<decltype(t)>(training, dy, x, s, count, mean, invstd, gamma, sum_dy, sum_dy_xhat, y,
                         mask, dx, l);
  });
}

void normalize(DType dt, uintptr_t x, Shape s, uintptr_t mean, uintptr_t invstd, uintptr_t gamma,
               uintptr_t beta, uintptr_t residual, bool relu_on, uintptr_t y, Launch l) {
  if (s.outer * s.channels * s.inner == 0) return;
  enter(l, "normalize");
  with_dtype(dt, [&](auto t) {
    normalize_impl<decltype(t)>(x, s, mean, invstd, gamma, beta, residual, relu_on, y, l);
  });
}

}  // namespace bnkernel::cuda
