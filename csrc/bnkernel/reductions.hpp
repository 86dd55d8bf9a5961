// Per-channel reductions (moments for the forward, the two sums for the backward) as leaf/merge
// operations for the deterministic tree in detail.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bnkernel/detail.hpp"

namespace bnkernel::detail {

// Calls f(pointer, length) on the contiguous runs holding values [j0, j1) of channel c, where a
// channel's j-th value is (o, i) = (j / inner, j % inner).
template <typename T, class F>
inline void for_channel_runs(const T* base, Shape s, int64_t c, int64_t j0, int64_t j1, F&& f) {
  int64_t j = j0;
  while (j < j1) {
    const int64_t o = j / s.inner;
    const int64_t i = j - o * s.inner;
    const int64_t len = std::min(s.inner - i, j1 - j);
    f(base + (o * s.channels + c) * s.inner + i, len);
    j += len;
  }
}

// The corrected M2 can come out a rounding error below zero; clamp that, but let NaN through
// (std::max(0.0, NaN) would turn a NaN channel into a variance of 0).
inline double clamp_m2(double m2) { return m2 < 0.0 ? 0.0 : m2; }

// ---- moments, planar pattern (inner > 1): one channel, accumulator (n, mean, M2) ----------------
//
// A leaf uses the corrected two-pass algorithm (Chan, Golub & LeVeque): mean from a first pass,
// then M2 = sum(d^2) - (sum d)^2 / n with d = x - mean; the second term removes the first-order
// error of the rounded mean.  Leaves are cache-resident, so the second pass is cheap.
template <typename T>
struct PlanarMoments {
  static constexpr int64_t width = 3;
  const T* x;
  Shape s;
  int64_t c;

  void leaf(int64_t k, double* out) const {
    const int64_t j0 = k * kPlanarLeaf;
    const int64_t j1 = std::min(s.per_channel(), j0 + kPlanarLeaf);
    double sum = 0.0;
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len) {
      double acc = 0.0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += static_cast<double>(p[i]);
      sum += acc;
    });
    const auto n = static_cast<double>(j1 - j0);
    const double mean = sum / n;
    double m2 = 0.0, corr = 0.0;
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len) {
      double acc2 = 0.0, acc1 = 0.0;
#pragma omp simd reduction(+ : acc2, acc1)
      for (int64_t i = 0; i < len; ++i) {
        const double d = static_cast<double>(p[i]) - mean;
        acc2 += d * d;
        acc1 += d;
      }
      m2 += acc2;
      corr += acc1;
    });
    out[0] = n;
    out[1] = mean + corr / n;
    out[2] = clamp_m2(m2 - corr * corr / n);
  }

  void merge(double* into, const double* other) const {
    chan_merge(into[0], into[1], into[2], other[0], other[1], other[2]);
  }
};

// ---- moments, interleaved pattern (inner == 1): all channels of a block of rows -----------------
// accumulator: [n, mean[C], M2[C], scratch[C]]
template <typename T>
struct InterleavedMoments {
  int64_t width;
  const T* x;
  int64_t rows;
  int64_t channels;
  int64_t leaf_rows;

  InterleavedMoments(const T* x_, Shape s)
      : width(1 + 3 * s.channels),
        x(x_),
        rows(s.outer),
        channels(s.channels),
        leaf_rows(interleaved_leaf_rows(s.channels)) {}

  int64_t leaves() const { return ceil_div(rows, leaf_rows); }

  void leaf(int64_t k, double* out) const {
    const int64_t C = channels;
    const int64_t r0 = k * leaf_rows;
    const int64_t r1 = std::min(rows, r0 + leaf_rows);
    const auto n = static_cast<double>(r1 - r0);
    double* __restrict__ mean = out + 1;
    double* __restrict__ m2 = out + 1 + C;
    double* __restrict__ corr = out + 1 + 2 * C;
    std::fill(mean, mean + C, 0.0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) mean[c] += static_cast<double>(row[c]);
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mean[c] /= n;
    std::fill(m2, m2 + 2 * C, 0.0);  // m2 and corr
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(row[c]) - mean[c];
        m2[c] += d * d;
        corr[c] += d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      mean[c] += corr[c] / n;
      m2[c] = clamp_m2(m2[c] - corr[c] * corr[c] / n);
    }
    out[0] = n;
  }

  void merge(double* into, const double* other) const {
    const int64_t C = channels;
    const double na = into[0], nb = other[0];
    if (nb == 0.0) return;
    if (na == 0.0) {
      std::copy(other, other + 1 + 2 * C, into);
      return;
    }
    const double total = na + nb;
    const double wb = nb / total, wab = na * nb / total;
    double* __restrict__ mean = into + 1;
    double* __restrict__ m2 = into + 1 + C;
    const double* __restrict__ meanb = other + 1;
    const double* __restrict__ m2b = other + 1 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double delta = meanb[c] - mean[c];
      mean[c] += delta * wb;
      m2[c] += m2b[c] + delta * delta * wab;
    }
    into[0] = total;
  }
};

// ---- backward sums: (sum dy, sum dy * (x - mean)) -----------------------------------------------

template <typename T>
struct PlanarSums {
  static constexpr int64_t width = 2;
  const T* dy;
  const T* x;
  Shape s;
  int64_t c;
  double mean;

  void leaf(int64_t k, double* out) const {
    const int64_t j0 = k * kPlanarLeaf;
    const int64_t j1 = std::min(s.per_channel(), j0 + kPlanarLeaf);
    // dy and x share the layout, so a run of x at offset p - x is the same run of dy
    double sdy = 0.0, sdyd = 0.0;
    for_channel_runs(x, s, c, j0, j1, [&](const T* px, int64_t len) {
      const T* pdy = dy + (px - x);
      double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < len; ++i) {
        const double g = static_cast<double>(pdy[i]);
        a += g;
        b += g * (static_cast<double>(px[i]) - mean);
      }
      sdy += a;
      sdyd += b;
    });
    out[0] = sdy;
    out[1] = sdyd;
  }

  void merge(double* into, const double* other) const {
    into[0] += other[0];
    into[1] += other[1];
  }
};

// accumulator: [sum dy[C], sum dy*(x-mean)[C]]
template <typename T>
struct InterleavedSums {
  int64_t width;
  const T* dy;
  const T* x;
  const double* mean;
  int64_t rows;
  int64_t channels;
  int64_t leaf_rows;

  InterleavedSums(const T* dy_, const T* x_, const double* mean_, Shape s)
      : width(2 * s.channels),
        dy(dy_),
        x(x_),
        mean(mean_),
        rows(s.outer),
        channels(s.channels),
        leaf_rows(interleaved_leaf_rows(s.channels)) {}

  int64_t leaves() const { return ceil_div(rows, leaf_rows); }

  void leaf(int64_t k, double* out) const {
    const int64_t C = channels;
    const int64_t r0 = k * leaf_rows;
    const int64_t r1 = std::min(rows, r0 + leaf_rows);
    double* __restrict__ sdy = out;
    double* __restrict__ sdyd = out + C;
    std::fill(out, out + 2 * C, 0.0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      const T* gr = dy + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double g = static_cast<double>(gr[c]);
        sdy[c] += g;
        sdyd[c] += g * (static_cast<double>(xr[c]) - mean[c]);
      }
    }
  }

  void merge(double* into, const double* other) const {
#pragma omp simd
    for (int64_t c = 0; c < 2 * channels; ++c) into[c] += other[c];
  }
};

// ---- drivers ------------------------------------------------------------------------------------

// Moments of one channel (planar pattern), with `threads` sharing its subtrees.
template <typename T>
void planar_channel_moments(const T* x, Shape s, int64_t c, int threads, double& mean, double& m2) {
  const int64_t leaves = ceil_div(s.per_channel(), kPlanarLeaf);
  if (leaves == 0) {
    mean = 0.0;
    m2 = 0.0;
    return;
  }
  double out[3];
  parallel_tree(PlanarMoments<T>{x, s, c}, leaves, out, threads);
  mean = out[1];
  m2 = out[2];
}

template <typename T>
void interleaved_moments(const T* x, Shape s, int threads, double* mean, double* m2) {
  const InterleavedMoments<T> ops(x, s);
  const int64_t C = s.channels;
  if (ops.leaves() == 0) {
    std::fill(mean, mean + C, 0.0);
    std::fill(m2, m2 + C, 0.0);
    return;
  }
  std::vector<double> out(static_cast<size_t>(ops.width));
  parallel_tree(ops, ops.leaves(), out.data(), threads);
  std::copy(out.begin() + 1, out.begin() + 1 + C, mean);
  std::copy(out.begin() + 1 + C, out.begin() + 1 + 2 * C, m2);
}

template <typename T>
void planar_channel_sums(const T* dy, const T* x, Shape s, int64_t c, double mean, int threads,
                         double& sum_dy, double& sum_dyd) {
  const int64_t leaves = ceil_div(s.per_channel(), kPlanarLeaf);
  if (leaves == 0) {
    sum_dy = 0.0;
    sum_dyd = 0.0;
    return;
  }
  double out[2];
  parallel_tree(PlanarSums<T>{dy, x, s, c, mean}, leaves, out, threads);
  sum_dy = out[0];
  sum_dyd = out[1];
}

template <typename T>
void interleaved_sums(const T* dy, const T* x, Shape s, const double* mean, int threads,
                      double* sum_dy, double* sum_dyd) {
  const InterleavedSums<T> ops(dy, x, mean, s);
  const int64_t C = s.channels;
  if (ops.leaves() == 0) {
    std::fill(sum_dy, sum_dy + C, 0.0);
    std::fill(sum_dyd, sum_dyd + C, 0.0);
    return;
  }
  std::vector<double> out(static_cast<size_t>(ops.width));
  parallel_tree(ops, ops.leaves(), out.data(), threads);
  std::copy(out.begin(), out.begin() + C, sum_dy);
  std::copy(out.begin() + C, out.begin() + 2 * C, sum_dyd);
}

// Whether the planar kernels should give each thread whole channels (and fuse the passes of a
// channel while it is in cache) rather than share every channel's subtrees among the threads.
inline bool whole_channels_per_thread(Shape s, int threads) {
  return threads <= 1 || s.channels >= int64_t{4} * threads;
}

}  // namespace bnkernel::detail
