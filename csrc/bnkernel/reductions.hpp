// Per-channel reductions (moments for the forward, the two sums for the backward) as leaf/merge
// operations for the deterministic tree in detail.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bnkernel/detail.hpp"
#include "bnkernel/lanes.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// Calls f(pointer, length) on the contiguous runs holding values [j0, j1) of channel c, where a
// channel's j-th value is (o, i) = (j / inner, j % inner).
template <typename T, class F>
inline void for_channel_runs(const T* base, Shape s, int64_t c, int64_t j0, int64_t j1, F&& f) {
  int64_t j = j0;
  while (j < j1) {
    const int64_t o = j / s.inner;
    const int64_t i = j - o * s.inner;
    const int64_t len = std::min(s.inner - i, j1 - j);
    const T* run = base + (o * s.channels + c) * s.inner + i;
    if (j + len < j1 && i + len == s.inner) {
      // the next run starts a channel stride away, where the hardware prefetcher has no stream
      // yet: ask for its first lines now, so they arrive while this run is summed
      const char* next = reinterpret_cast<const char*>(run + len + (s.channels - 1) * s.inner);
      for (int line = 0; line < 8; ++line) __builtin_prefetch(next + 64 * line);
    }
    f(run, len);
    j += len;
  }
}

// The corrected M2 can come out a rounding error below zero; clamp that, but let NaN through
// (std::max(0.0, NaN) would turn a NaN channel into a variance of 0).
inline double clamp_m2(double m2) {
  return m2 < 0.0 ? 0.0 : m2;
}

// ---- moments, planar pattern (inner > 1): one channel, accumulator (n, mean, M2) ----------------
//
// A leaf accumulates d = x - center in double: mean = center + sum(d) / n and
// M2 = sum(d^2) - sum(d)^2 / n.  For float64 data the center is the leaf's mean from a first pass
// (the corrected two-pass algorithm of Chan, Golub & LeVeque; the second term removes the error of
// the rounded mean).  For float32 and 16-bit data one pass suffices: the center is the leaf's first
// value, and since (center - mean)^2 <= M2 for any value of the leaf, the cancellation in M2 costs
// at most a factor 2n (n <= kPlanarLeaf) on double precision, ~1e-12 relative: far below float32's
// resolution, at half the arithmetic.
template <typename T>
struct PlanarMoments {
  static constexpr int64_t width = 3;
  const T* x;
  Shape s;
  int64_t c;

  double first_value(int64_t j) const {
    const int64_t o = j / s.inner;
    return widen(x[(o * s.channels + c) * s.inner + (j - o * s.inner)]);
  }

  // mean of values [j0, j1) (a tail padded with 0, which adds nothing)
  double leaf_mean(int64_t j0, int64_t j1, double* tail) const {
    Lanes sum;
    auto add = [&](const auto* b) {
      for_each_vec([&](int v, int64_t o) { sum.v[v] += loadv(b + o); });
    };
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len) {
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) add(p + i);
      if (i < len) {
        pad_tail(p + i, len - i, 0.0, tail);
        add(tail);
      }
    });
    return sum.total() / static_cast<double>(j1 - j0);
  }

  void leaf(int64_t k, double* out) const {
    const int64_t j0 = k * kPlanarLeaf;
    const int64_t j1 = std::min(s.per_channel(), j0 + kPlanarLeaf);
    alignas(64) double tail[kLanes];
    const auto n = static_cast<double>(j1 - j0);
    const double center = !std::is_same_v<T, double> ? first_value(j0) : leaf_mean(j0, j1, tail);
    // sums of d^2 and of d, d = x - center (a tail padded with center: d = 0)
    const vd vcenter = splat(center);
    Lanes m2, corr;
    auto add2 = [&](const auto* b) {
      for_each_vec([&](int v, int64_t o) {
        const vd d = loadv(b + o) - vcenter;
        m2.v[v] = fmav(d, d, m2.v[v]);
        corr.v[v] += d;
      });
    };
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len) {
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) add2(p + i);
      if (i < len) {
        pad_tail(p + i, len - i, center, tail);
        add2(tail);
      }
    });
    const double dsum = corr.total();
    out[0] = n;
    out[1] = center + dsum / n;
    out[2] = clamp_m2(m2.total() - dsum * dsum / n);
  }

  void merge(double* into, const double* other) const {
    chan_merge(into[0], into[1], into[2], other[0], other[1], other[2]);
  }
};

// ---- moments over the valid positions of a mask, planar pattern
// ------------------------------------
//
// mask has one byte per position (o, i), at o * inner + i, nonzero where valid: the same index as
// a channel's j-th value.  A leaf takes its valid values' mean as the center (a first pass), then
// d = x - center over them as PlanarMoments does; padded values never enter an operation that
// reaches the sums (they are masked out on the bits, so NaN or inf padding is harmless).
inline vd mask_bits(const uint8_t* m) {
  vq q;
  for (int64_t i = 0; i < kVecLen; ++i) q[i] = -static_cast<int64_t>(m[i] != 0);
  return reinterpret_cast<vd>(q);
}
inline vd select_bits(vd v, vd mask) {
  return reinterpret_cast<vd>(reinterpret_cast<vq>(v) & reinterpret_cast<vq>(mask));
}

template <typename T>
struct MaskedPlanarMoments {
  static constexpr int64_t width = 3;
  const T* x;
  const uint8_t* mask;
  Shape s;
  int64_t c;

  // f(values, mask bytes, len) over the runs of values [j0, j1) in order
  template <class F>
  void runs(int64_t j0, int64_t j1, F&& f) const {
    int64_t j = j0;
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len) {
      f(p, mask + j, len);
      j += len;
    });
  }

  void leaf(int64_t k, double* out) const {
    const int64_t j0 = k * kPlanarLeaf;
    const int64_t j1 = std::min(s.per_channel(), j0 + kPlanarLeaf);
    alignas(64) double tail[kLanes];
    alignas(64) uint8_t tail_mask[kLanes];
    int64_t count = 0;
    Lanes sum;
    runs(j0, j1, [&](const T* p, const uint8_t* m, int64_t len) {
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        for_each_vec([&](int v, int64_t o) {
          sum.v[v] += select_bits(loadv(p + i + o), mask_bits(m + i + o));
        });
      }
      if (i < len) {
        for (int64_t q = 0; q < kLanes; ++q) tail_mask[q] = q < len - i ? m[i + q] : 0;
        pad_tail(p + i, len - i, 0.0, tail);
        for_each_vec([&](int v, int64_t o) {
          sum.v[v] += select_bits(loadv(tail + o), mask_bits(tail_mask + o));
        });
      }
      for (int64_t q = 0; q < len; ++q) count += m[q] != 0;
    });
    if (count == 0) {
      out[0] = out[1] = out[2] = 0.0;  // neutral in the merge
      return;
    }
    const auto n = static_cast<double>(count);
    const double center = sum.total() / n;
    const vd vcenter = splat(center);
    Lanes m2, corr;
    auto add2 = [&](const auto* b, const uint8_t* m) {
      for_each_vec([&](int v, int64_t o) {
        const vd d = select_bits(loadv(b + o) - vcenter, mask_bits(m + o));
        m2.v[v] = fmav(d, d, m2.v[v]);
        corr.v[v] += d;
      });
    };
    runs(j0, j1, [&](const T* p, const uint8_t* m, int64_t len) {
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) add2(p + i, m + i);
      if (i < len) {
        for (int64_t q = 0; q < kLanes; ++q) tail_mask[q] = q < len - i ? m[i + q] : 0;
        pad_tail(p + i, len - i, center, tail);
        add2(tail, tail_mask);
      }
    });
    const double dsum = corr.total();
    out[0] = n;
    out[1] = center + dsum / n;
    out[2] = clamp_m2(m2.total() - dsum * dsum / n);
  }

  void merge(double* into, const double* other) const {
    chan_merge(into[0], into[1], into[2], other[0], other[1], other[2]);
  }
};

// ---- moments, interleaved pattern (inner == 1): all channels of a block of rows -----------------
// accumulator: [n, mean[C], M2[C], scratch[C]]
// With Masked, rows whose mask byte is zero (padded positions: a row is one position) are skipped.
template <typename T, bool Masked = false>
struct InterleavedMoments {
  int64_t width;
  const T* x;  // the window's first column
  int64_t rows;
  int64_t channels;   // columns in the window
  int64_t stride;     // values per row of the array
  int64_t leaf_rows;  // from the whole row, so every window has the same tree
  const uint8_t* mask = nullptr;

  InterleavedMoments(const T* x_, Shape s, int64_t col0, int64_t cols,
                     const uint8_t* mask_ = nullptr)
      : width(1 + 3 * cols),
        x(x_ + col0),
        rows(s.outer),
        channels(cols),
        stride(s.channels),
        leaf_rows(interleaved_leaf_rows(s.channels, 1)),
        mask(mask_) {}

  bool skip(int64_t r) const {
    if constexpr (Masked) {
      return mask[r] == 0;
    } else {
      (void)r;
      return false;
    }
  }

  int64_t leaves() const { return ceil_div(rows, leaf_rows); }

  void leaf(int64_t k, double* out) const {
    const int64_t C = channels;
    int64_t r0 = k * leaf_rows;
    const int64_t r1 = std::min(rows, r0 + leaf_rows);
    const int64_t next_end = std::min(rows, r1 + leaf_rows);
    int64_t count = r1 - r0;
    if constexpr (Masked) {
      count = 0;
      for (int64_t r = r0; r < r1; ++r) count += mask[r] != 0;
      if (count == 0) {
        std::fill(out, out + 1 + 2 * C, 0.0);  // neutral in the merge
        return;
      }
      while (skip(r0)) ++r0;  // the first valid row (the center below float64)
    }
    const auto n = static_cast<double>(count);
    double* __restrict__ mean = out + 1;
    double* __restrict__ m2 = out + 1 + C;
    double* __restrict__ corr = out + 1 + 2 * C;
    // The channels are taken kLanes at a time with their sums in registers across the leaf's
    // rows, then the few left over with their sums in memory.  Either way each channel's values
    // are added row after row, so the results do not depend on which channels share a block.
    const int64_t blocked = C - C % kLanes;
    // the center of each channel (see PlanarMoments): the first row below float64, else the mean
    if constexpr (!std::is_same_v<T, double>) {
      const T* first = x + r0 * stride;
      for (int64_t c = 0; c < C; ++c) mean[c] = widen(first[c]);
    } else {
      for (int64_t c = 0; c < blocked; c += kLanes) {
        vd a[kVecs];
        for_each_vec([&](int v, int64_t) { a[v] = splat(0.0); });
        for (int64_t r = r0; r < r1; ++r) {
          if (skip(r)) continue;
          const T* row = x + r * stride + c;
          for_each_vec([&](int v, int64_t o) { a[v] += loadv(row + o); });
        }
        for_each_vec([&](int v, int64_t o) { std::memcpy(mean + c + o, &a[v], sizeof(vd)); });
      }
      std::fill(mean + blocked, mean + C, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        if (skip(r)) continue;
        const T* row = x + r * stride;
#pragma omp simd
        for (int64_t c = blocked; c < C; ++c) mean[c] += widen(row[c]);
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) mean[c] /= n;
    }
    for (int64_t c = 0; c < blocked; c += kLanes) {
      // the same columns of the next leaf, spread over this leaf's blocks (see prefetch_l2)
      for (int64_t r = r1; r < next_end; ++r) {
        prefetch_l2(x + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
      }
      vd center[kVecs], a2[kVecs], a1[kVecs];
      for_each_vec([&](int v, int64_t o) {
        center[v] = loadv(mean + c + o);
        a2[v] = splat(0.0);
        a1[v] = splat(0.0);
      });
      for (int64_t r = r0; r < r1; ++r) {
        if (skip(r)) continue;
        const T* row = x + r * stride + c;
        for_each_vec([&](int v, int64_t o) {
          const vd d = loadv(row + o) - center[v];
          a2[v] = fmav(d, d, a2[v]);
          a1[v] += d;
        });
      }
      for_each_vec([&](int v, int64_t o) {
        std::memcpy(m2 + c + o, &a2[v], sizeof(vd));
        std::memcpy(corr + c + o, &a1[v], sizeof(vd));
      });
    }
    std::fill(m2 + blocked, m2 + C, 0.0);
    std::fill(corr + blocked, corr + C, 0.0);
    for (int64_t r = r0; r < r1; ++r) {
      if (skip(r)) continue;
      const T* row = x + r * stride;
#pragma omp simd
      for (int64_t c = blocked; c < C; ++c) {
        const double d = widen(row[c]) - mean[c];
        m2[c] = fmas(d, d, m2[c]);
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

// With Mask (a ReLU after the forward), g = masked_dy(dy, y) takes dy's place, and is written to
// dres when that is not null (the residual's gradient): each value of g is computed once, by the
// one leaf that holds it.
template <typename T, bool Mask>
struct PlanarSums {
  static constexpr int64_t width = 2;
  const T* dy;
  const T* x;
  const T* y;
  T* dres;
  Shape s;
  int64_t c;
  double mean;

  void leaf(int64_t k, double* out) const {
    const int64_t j0 = k * kPlanarLeaf;
    const int64_t j1 = std::min(s.per_channel(), j0 + kPlanarLeaf);
    // dy and x share the layout, so a run of x at offset p - x is the same run of dy.  Tails are
    // padded with g = 0 and x = mean, which add nothing.
    alignas(64) double tail_dy[kLanes], tail_x[kLanes];
    const vd vmean = splat(mean);
    Lanes a, b;
    auto add = [&](const vd* g, const auto* xs) {
      for_each_vec([&](int v, int64_t o) {
        a.v[v] += g[v];
        b.v[v] = fmav(g[v], loadv(xs + o) - vmean, b.v[v]);
      });
    };
    for_channel_runs(x, s, c, j0, j1, [&](const T* px, int64_t len) {
      const int64_t at = px - x;
      const T* pdy = dy + at;
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        vd g[kVecs];
        for_each_vec([&](int v, int64_t o) {
          g[v] = loadv(pdy + i + o);
          if constexpr (Mask) {
            g[v] = masked_vec(g[v], loadv(y + at + i + o));
            if (dres) storev(dres + at + i + o, g[v]);
          }
        });
        add(g, px + i);
      }
      if (i < len) {
        const int64_t rest = len - i;
        for (int64_t q = 0; q < kLanes; ++q) {
          double g = 0.0;
          if (q < rest) {
            g = Mask ? masked_dy(pdy[i + q], y[at + i + q]) : widen(pdy[i + q]);
            if (Mask && dres) dres[at + i + q] = narrow<T>(g);
          }
          tail_dy[q] = g;
        }
        pad_tail(px + i, rest, mean, tail_x);
        vd g[kVecs];
        for_each_vec([&](int v, int64_t o) { g[v] = loadv(tail_dy + o); });
        add(g, tail_x);
      }
    });
    const double sdy = a.total();
    const double sdyd = b.total();
    out[0] = sdy;
    out[1] = sdyd;
  }

  void merge(double* into, const double* other) const {
    into[0] += other[0];
    into[1] += other[1];
  }
};

// accumulator: [sum dy[C], sum dy*(x-mean)[C]]
template <typename T, bool Mask>
struct InterleavedSums {
  int64_t width;
  const T* dy;  // the window's first column, as x, y, dres and mean
  const T* x;
  const T* y;
  T* dres;
  const double* mean;
  int64_t rows;
  int64_t channels;  // columns in the window
  int64_t stride;    // values per row of the array
  int64_t leaf_rows;

  InterleavedSums(const T* dy_, const T* x_, const T* y_, T* dres_, const double* mean_, Shape s,
                  int64_t col0, int64_t cols)
      : width(2 * cols),
        dy(dy_ + col0),
        x(x_ + col0),
        y(y_ ? y_ + col0 : nullptr),
        dres(dres_ ? dres_ + col0 : nullptr),
        mean(mean_ + col0),
        rows(s.outer),
        channels(cols),
        stride(s.channels),
        leaf_rows(interleaved_leaf_rows(s.channels, 2)) {}

  int64_t leaves() const { return ceil_div(rows, leaf_rows); }

  void leaf(int64_t k, double* out) const {
    const int64_t C = channels;
    const int64_t r0 = k * leaf_rows;
    const int64_t r1 = std::min(rows, r0 + leaf_rows);
    const int64_t next_end = std::min(rows, r1 + leaf_rows);
    double* __restrict__ sdy = out;
    double* __restrict__ sdyd = out + C;
    // channel blocks in registers, then the rest in memory, as in InterleavedMoments
    const int64_t blocked = C - C % kLanes;
    for (int64_t c = 0; c < blocked; c += kLanes) {
      for (int64_t r = r1; r < next_end; ++r) {  // as in InterleavedMoments
        prefetch_l2(x + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
        prefetch_l2(dy + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
        if constexpr (Mask)
          prefetch_l2(y + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
      }
      vd mu[kVecs], a[kVecs], b[kVecs];
      for_each_vec([&](int v, int64_t o) {
        mu[v] = loadv(mean + c + o);
        a[v] = splat(0.0);
        b[v] = splat(0.0);
      });
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * stride + c;
        for_each_vec([&](int v, int64_t o) {
          vd g = loadv(dy + at + o);
          if constexpr (Mask) {
            g = masked_vec(g, loadv(y + at + o));
            if (dres) storev(dres + at + o, g);
          }
          a[v] += g;
          b[v] = fmav(g, loadv(x + at + o) - mu[v], b[v]);
        });
      }
      for_each_vec([&](int v, int64_t o) {
        std::memcpy(sdy + c + o, &a[v], sizeof(vd));
        std::memcpy(sdyd + c + o, &b[v], sizeof(vd));
      });
    }
    std::fill(sdy + blocked, sdy + C, 0.0);
    std::fill(sdyd + blocked, sdyd + C, 0.0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * stride;
      const T* gr = dy + r * stride;
      const T* yr = Mask ? y + r * stride : nullptr;
      T* resr = Mask && dres ? dres + r * stride : nullptr;
#pragma omp simd
      for (int64_t c = blocked; c < C; ++c) {
        double g = widen(gr[c]);
        if constexpr (Mask) {
          g = masked_dy(gr[c], yr[c]);
          if (resr) resr[c] = narrow<T>(g);
        }
        sdy[c] += g;
        sdyd[c] = fmas(g, widen(xr[c]) - mean[c], sdyd[c]);
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

// Columns per window of the interleaved reductions: a wide array (many channels, or the columns
// of short planar runs) is reduced a window of columns at a time, the windows shared among the
// threads, so that a leaf stays cache-sized.  A column's result does not depend on its window.
constexpr int64_t kColumnWindow = 2048;

// f(col0, cols) for the windows of s.channels columns: the whole row when it is narrow, else
// windows shared among the threads (then each runs its tree on one thread).
template <class F>
void for_each_window(Shape s, int& threads, F&& f) {
  if (s.channels <= kColumnWindow) {
    f(int64_t{0}, s.channels);
    return;
  }
  const int64_t windows = ceil_div(s.channels, kColumnWindow);
  const int outer_threads = threads;
  threads = 1;
  for_each_channel(windows, outer_threads, false, [&](int64_t w) {
    const int64_t col0 = w * kColumnWindow;
    f(col0, std::min(kColumnWindow, s.channels - col0));
  });
}

template <typename T, bool Masked = false>
void interleaved_moments(const T* x, Shape s, int threads, double* mean, double* m2,
                         const uint8_t* mask = nullptr) {
  for_each_window(s, threads, [&](int64_t col0, int64_t cols) {
    const InterleavedMoments<T, Masked> ops(x, s, col0, cols, mask);
    if (ops.leaves() == 0) {
      std::fill(mean + col0, mean + col0 + cols, 0.0);
      std::fill(m2 + col0, m2 + col0 + cols, 0.0);
      return;
    }
    Workspace ws;
    double* out = ws.take<double>(ops.width);
    parallel_tree(ops, ops.leaves(), out, threads);
    std::copy(out + 1, out + 1 + cols, mean + col0);
    std::copy(out + 1 + cols, out + 1 + 2 * cols, m2 + col0);
  });
}

template <typename T>
void planar_channel_sums(const T* dy, const T* x, Shape s, int64_t c, double mean, int threads,
                         double& sum_dy, double& sum_dyd, ReluGrad<T> relu) {
  const int64_t leaves = ceil_div(s.per_channel(), kPlanarLeaf);
  if (leaves == 0) {
    sum_dy = 0.0;
    sum_dyd = 0.0;
    return;
  }
  double out[2];
  with_flag(relu.y != nullptr, [&](auto mask) {
    parallel_tree(PlanarSums<T, decltype(mask)::value>{dy, x, relu.y, relu.dresidual, s, c, mean},
                  leaves, out, threads);
  });
  sum_dy = out[0];
  sum_dyd = out[1];
}

template <typename T>
void interleaved_sums(const T* dy, const T* x, Shape s, const double* mean, int threads,
                      double* sum_dy, double* sum_dyd, ReluGrad<T> relu) {
  for_each_window(s, threads, [&](int64_t col0, int64_t cols) {
    with_flag(relu.y != nullptr, [&](auto mask) {
      const InterleavedSums<T, decltype(mask)::value> ops(dy, x, relu.y, relu.dresidual, mean, s,
                                                          col0, cols);
      if (ops.leaves() == 0) {
        std::fill(sum_dy + col0, sum_dy + col0 + cols, 0.0);
        std::fill(sum_dyd + col0, sum_dyd + col0 + cols, 0.0);
        return;
      }
      Workspace ws;
      double* out = ws.take<double>(ops.width);
      parallel_tree(ops, ops.leaves(), out, threads);
      std::copy(out, out + cols, sum_dy + col0);
      std::copy(out + cols, out + 2 * cols, sum_dyd + col0);
    });
  });
}

// Whether the planar kernels should give each thread whole channels (and fuse the passes of a
// channel while it is in cache) rather than share every channel's subtrees among the threads.
inline bool whole_channels_per_thread(Shape s, int threads) {
  return threads <= 1 || s.channels >= int64_t{4} * threads;
}

// Below this many values per (batch, channel) run the planar pattern reads short runs that share
// their cache lines with other channels; such arrays are reduced as if interleaved instead:
// (outer, C * inner) columns, whose statistics are then merged per channel.
constexpr int64_t kMinPlanarRun = 256;

// (The per-column statistics take 24 bytes a column; with 8 or more rows that is less than the
// input itself, so the column path is kept to those.)
inline bool short_runs(Shape s) {
  return s.inner > 1 && s.inner < kMinPlanarRun && s.outer >= 8;
}

// The fused per-channel kernels (statistics or sums, then the elementwise pass, a channel at a
// time while it is in cache) pay off for long runs and enough channels to share.
inline bool fuse_per_channel(Shape s, int threads) {
  return s.inner >= kMinPlanarRun && whole_channels_per_thread(s, threads);
}

// Moments of every channel, by whichever pattern suits the shape; deterministic in the thread count
// (the choice of pattern depends on the shape alone).
template <typename T>
void channel_moments(const T* x, Shape s, int threads, double* mean, double* m2) {
  if (s.inner == 1) {
    interleaved_moments(x, s, threads, mean, m2);
  } else if (short_runs(s)) {
    // per-column moments over the outer rows, then each channel's inner columns merged in order
    const Shape wide{s.outer, s.channels * s.inner, 1};
    Workspace ws;
    double* col_mean = ws.take<double>(wide.channels);
    double* col_m2 = ws.take<double>(wide.channels);
    interleaved_moments(x, wide, threads, col_mean, col_m2);
    const auto rows = static_cast<double>(s.outer);
    for (int64_t c = 0; c < s.channels; ++c) {
      double n = 0.0, mu = 0.0, q = 0.0;
      for (int64_t i = 0; i < s.inner; ++i) {
        const int64_t col = c * s.inner + i;
        chan_merge(n, mu, q, rows, col_mean[col], col_m2[col]);
      }
      mean[c] = mu;
      m2[c] = q;
    }
  } else if (whole_channels_per_thread(s, threads)) {
    for_each_channel(s.channels, threads, false,
                     [&](int64_t c) { planar_channel_moments(x, s, c, 1, mean[c], m2[c]); });
  } else {
    for (int64_t c = 0; c < s.channels; ++c) {
      planar_channel_moments(x, s, c, threads, mean[c], m2[c]);
    }
  }
}

// Moments over the valid positions of `mask` (see MaskedPlanarMoments), every channel; a channel
// with no valid value gets (0, 0).  The pattern depends on the shape alone, as above, without the
// short-run columns (their positions vary along a row).
template <typename T>
void masked_channel_moments(const T* x, Shape s, const uint8_t* mask, int threads, double* mean,
                            double* m2) {
  if (s.inner == 1) {
    interleaved_moments<T, true>(x, s, threads, mean, m2, mask);
    return;
  }
  auto one = [&](int64_t c, int channel_threads) {
    const int64_t leaves = ceil_div(s.per_channel(), kPlanarLeaf);
    double out[3] = {0.0, 0.0, 0.0};
    if (leaves > 0) {
      parallel_tree(MaskedPlanarMoments<T>{x, mask, s, c}, leaves, out, channel_threads);
    }
    mean[c] = out[1];
    m2[c] = out[2];
  };
  if (whole_channels_per_thread(s, threads)) {
    for_each_channel(s.channels, threads, false, [&](int64_t c) { one(c, 1); });
  } else {
    for (int64_t c = 0; c < s.channels; ++c) one(c, threads);
  }
}

// (sum dy, sum dy * (x - mean)) of every channel, likewise.
template <typename T>
void channel_sums(const T* dy, const T* x, Shape s, const double* mean, int threads, double* sum_dy,
                  double* sum_dyd, ReluGrad<T> relu) {
  if (s.inner == 1) {
    interleaved_sums(dy, x, s, mean, threads, sum_dy, sum_dyd, relu);
  } else if (short_runs(s)) {
    const Shape wide{s.outer, s.channels * s.inner, 1};
    Workspace ws;
    double* col_mean = ws.take<double>(wide.channels);
    double* col_dy = ws.take<double>(wide.channels);
    double* col_dyd = ws.take<double>(wide.channels);
    for (int64_t c = 0; c < s.channels; ++c) std::fill_n(col_mean + c * s.inner, s.inner, mean[c]);
    interleaved_sums(dy, x, wide, col_mean, threads, col_dy, col_dyd, relu);
    for (int64_t c = 0; c < s.channels; ++c) {
      double a = 0.0, b = 0.0;
      for (int64_t i = 0; i < s.inner; ++i) {
        a += col_dy[c * s.inner + i];
        b += col_dyd[c * s.inner + i];
      }
      sum_dy[c] = a;
      sum_dyd[c] = b;
    }
  } else if (whole_channels_per_thread(s, threads)) {
    for_each_channel(s.channels, threads, false, [&](int64_t c) {
      planar_channel_sums(dy, x, s, c, mean[c], 1, sum_dy[c], sum_dyd[c], relu);
    });
  } else {
    for (int64_t c = 0; c < s.channels; ++c) {
      planar_channel_sums(dy, x, s, c, mean[c], threads, sum_dy[c], sum_dyd[c], relu);
    }
  }
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
