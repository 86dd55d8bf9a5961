// The elementwise passes, for both memory patterns.  Everything is computed in double and rounded
// once to T at the store.
#pragma once

#include <cstdint>

#include "bnkernel/detail.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// gamma and beta are optional (affine=False): 1 and 0 then.
template <typename T>
inline double gamma_of(const T* gamma, int64_t c) {
  return gamma ? static_cast<double>(gamma[c]) : 1.0;
}
template <typename T>
inline double beta_of(const T* beta, int64_t c) {
  return beta ? static_cast<double>(beta[c]) : 0.0;
}

// y = (x - mean[c]) * scale[c] + shift[c] over a contiguous run of one channel.
//
// (x - mean) first, not x * scale + (shift - mean * scale): when |mean| >> std the folded form
// cancels catastrophically, while x - mean is exact or nearly so.
template <typename T>
inline void affine_run(const T* __restrict__ x, T* __restrict__ y, int64_t len, double mean,
                       double scale, double shift) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = static_cast<T>((static_cast<double>(x[i]) - mean) * scale + shift);
  }
}

template <typename T>
void affine(const T* x, Shape s, const double* mean, const double* scale, const double* shift, T* y,
            int threads) {
  if (s.size() == 0) return;  // nothing to do, and inner == 0 must not take the row loop
  if (s.inner != 1) {
    for_each_run(s, threads, [&](int64_t c, int64_t offset, int64_t len) {
      affine_run(x + offset, y + offset, len, mean[c], scale[c], shift[c]);
    });
    return;
  }
  const int64_t C = s.channels;
  for_each_row_block(s, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict__ xr = x + r * C;
      T* __restrict__ yr = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        yr[c] = static_cast<T>((static_cast<double>(xr[c]) - mean[c]) * scale[c] + shift[c]);
      }
    }
  });
}

// Training backward, per channel, with k_scale = gamma * invstd, k_dy = sum_dy / m and
// k_x = invstd * sum_dy_xhat / m:
//   dx = k_scale * (dy - k_dy - (x - mean) * k_x)
template <typename T>
inline void grad_run(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                     int64_t len, double mean, double k_scale, double k_dy, double k_x) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const double d = static_cast<double>(x[i]) - mean;
    dx[i] = static_cast<T>(k_scale * (static_cast<double>(dy[i]) - k_dy - d * k_x));
  }
}

template <typename T>
void grad(const T* dy, const T* x, Shape s, const double* mean, const double* k_scale,
          const double* k_dy, const double* k_x, T* dx, int threads) {
  if (s.size() == 0) return;  // nothing to do, and inner == 0 must not take the row loop
  if (s.inner != 1) {
    for_each_run(s, threads, [&](int64_t c, int64_t offset, int64_t len) {
      grad_run(dy + offset, x + offset, dx + offset, len, mean[c], k_scale[c], k_dy[c], k_x[c]);
    });
    return;
  }
  const int64_t C = s.channels;
  for_each_row_block(s, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict__ gr = dy + r * C;
      const T* __restrict__ xr = x + r * C;
      T* __restrict__ dxr = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(xr[c]) - mean[c];
        dxr[c] = static_cast<T>(k_scale[c] * (static_cast<double>(gr[c]) - k_dy[c] - d * k_x[c]));
      }
    }
  });
}

// Frozen statistics: dx = dy * k_scale[c].
template <typename T>
inline void scale_run(const T* __restrict__ dy, T* __restrict__ dx, int64_t len, double k) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dx[i] = static_cast<T>(static_cast<double>(dy[i]) * k);
}

template <typename T>
void scale(const T* dy, Shape s, const double* k_scale, T* dx, int threads) {
  if (s.size() == 0) return;  // nothing to do, and inner == 0 must not take the row loop
  if (s.inner != 1) {
    for_each_run(s, threads, [&](int64_t c, int64_t offset, int64_t len) {
      scale_run(dy + offset, dx + offset, len, k_scale[c]);
    });
    return;
  }
  const int64_t C = s.channels;
  for_each_row_block(s, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict__ gr = dy + r * C;
      T* __restrict__ dxr = dx + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        dxr[c] = static_cast<T>(static_cast<double>(gr[c]) * k_scale[c]);
    }
  });
}

// Calls f(o, offset) for each of channel c's rows (planar pattern), offset = (o * C + c) * inner.
template <class F>
inline void for_channel_rows(Shape s, int64_t c, F&& f) {
  for (int64_t o = 0; o < s.outer; ++o) f((o * s.channels + c) * s.inner);
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
