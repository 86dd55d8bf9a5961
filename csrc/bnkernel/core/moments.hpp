// Per-channel moments (mean, M2), of every value or of a mask's valid positions: the leaf/merge
// operations for the deterministic tree (tree.hpp) and the drivers that pick a pattern per shape.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bnkernel/core/chan_merge.hpp"
#include "bnkernel/core/layout.hpp"
#include "bnkernel/core/parallel.hpp"
#include "bnkernel/core/plan.hpp"
#include "bnkernel/core/prefetch.hpp"
#include "bnkernel/core/tree.hpp"
#include "bnkernel/core/windows.hpp"
#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"
#include "bnkernel/runtime/workspace.hpp"
#include "bnkernel/simd/convert.hpp"
#include "bnkernel/simd/lanes.hpp"
#include "bnkernel/simd/vectors.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// The corrected M2 can come out a rounding error below zero; clamp that, but let NaN through
// (std::max(0.0, NaN) would turn a NaN channel into a variance of 0).
inline double clamp_m2(double m2) {
  return m2 < 0.0 ? 0.0 : m2;
}

// A leaf's (n, mean, M2) from its n values' sums of d = x - center and of d^2.
inline void leaf_moments(double* out, double n, double center, double dsum, double d2sum) {
  out[0] = n;
  out[1] = center + dsum / n;
  out[2] = clamp_m2(d2sum - dsum * dsum / n);
}

// Two (n, mean, M2) accumulators into one (Chan's merge).
inline void merge_moments(double* into, const double* other) {
  chan_merge(into[0], into[1], into[2], other[0], other[1], other[2]);
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
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len, const T* next) {
      Lanes a = sum;  // see Lanes: the run's sums in registers
      auto one = [&](int v, const auto* b) { a.v[v] += loadv(b); };
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        // this pass reads the leaf from memory, the next from cache
        prefetch_run_ahead(p, i, len, next, kLanes);
        for_each_vec([&](int v, int64_t o) { one(v, p + i + o); });
      }
      if (i < len) tail_vectors(p + i, len - i, 0.0, tail, one);
      sum = a;
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
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len, const T* next) {
      Lanes a2 = m2, a1 = corr;  // see Lanes: the run's sums in registers
      auto one = [&](int v, const auto* b) {
        const vd d = loadv(b) - vcenter;
        a2.v[v] = fmav(d, d, a2.v[v]);
        a1.v[v] += d;
      };
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        if constexpr (!std::is_same_v<T, double>) {  // else cached by leaf_mean
          prefetch_run_ahead(p, i, len, next, kLanes);
        }
        for_each_vec([&](int v, int64_t o) { one(v, p + i + o); });
      }
      if (i < len) tail_vectors(p + i, len - i, center, tail, one);
      m2 = a2;
      corr = a1;
    });
    leaf_moments(out, n, center, corr.total(), m2.total());
  }

  void merge(double* into, const double* other) const { merge_moments(into, other); }
};

// ---- moments over the valid positions of a mask, planar pattern ------------------------------
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
    for_channel_runs(x, s, c, j0, j1, [&](const T* p, int64_t len, const T*) {
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
      Lanes a = sum;  // see Lanes: the run's sums in registers
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        for_each_vec([&](int v, int64_t o) {
          a.v[v] += select_bits(loadv(p + i + o), mask_bits(m + i + o));
        });
      }
      if (i < len) {
        for (int64_t q = 0; q < kLanes; ++q) tail_mask[q] = q < len - i ? m[i + q] : 0;
        pad_tail(p + i, len - i, 0.0, tail);
        for_each_vec([&](int v, int64_t o) {
          a.v[v] += select_bits(loadv(tail + o), mask_bits(tail_mask + o));
        });
      }
      sum = a;
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
    runs(j0, j1, [&](const T* p, const uint8_t* m, int64_t len) {
      Lanes a2 = m2, a1 = corr;  // see Lanes: the run's sums in registers
      auto add2 = [&](const auto* b, const uint8_t* mb) {
        for_each_vec([&](int v, int64_t o) {
          const vd d = select_bits(loadv(b + o) - vcenter, mask_bits(mb + o));
          a2.v[v] = fmav(d, d, a2.v[v]);
          a1.v[v] += d;
        });
      };
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) add2(p + i, m + i);
      if (i < len) {
        for (int64_t q = 0; q < kLanes; ++q) tail_mask[q] = q < len - i ? m[i + q] : 0;
        pad_tail(p + i, len - i, center, tail);
        add2(tail, tail_mask);
      }
      m2 = a2;
      corr = a1;
    });
    leaf_moments(out, n, center, corr.total(), m2.total());
  }

  void merge(double* into, const double* other) const { merge_moments(into, other); }
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

  // The same columns of the next chunk's rows (of this leaf or the next) into L2, while this
  // chunk's block is summed, by the pass that reads the leaf from memory (see prefetch_l2).  (A
  // lambda doing the same inside leaf() lost its prefetches to GCC 12's optimizer for float.)
  void fetch_next_chunk(int64_t q1, int64_t chunk, int64_t c) const {
    const int64_t end = std::min(rows, q1 + chunk);
    for (int64_t r = q1; r < end; ++r) {
      prefetch_l2(x + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
    }
  }

  void leaf(int64_t k, double* out) const {
    const int64_t C = channels;
    int64_t r0 = k * leaf_rows;
    const int64_t r1 = std::min(rows, r0 + leaf_rows);
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
    // The channels are taken kLanes at a time with their sums in registers down a chunk of the
    // leaf's rows (stored between chunks, see interleaved_chunk_rows), then the few left over with
    // their sums in memory.  Either way each channel's values are added row after row, so the
    // results depend neither on which channels share a block nor on the chunks.
    const int64_t blocked = C - C % kLanes;
    const int64_t chunk = interleaved_chunk_rows(1);
    // the center of each channel (see PlanarMoments): the first row below float64, else the mean
    if constexpr (!std::is_same_v<T, double>) {
      const T* first = x + r0 * stride;
      for (int64_t c = 0; c < C; ++c) mean[c] = widen(first[c]);
    } else {
      for (int64_t q0 = r0; q0 < r1; q0 += chunk) {
        const int64_t q1 = std::min(r1, q0 + chunk);
        for (int64_t c = 0; c < blocked; c += kLanes) {
          fetch_next_chunk(q1, chunk, c);
          vd a[kVecs];
          for_each_vec(
              [&](int v, int64_t o) { a[v] = q0 == r0 ? splat(0.0) : loadv(mean + c + o); });
          for (int64_t r = q0; r < q1; ++r) {
            if (skip(r)) continue;
            const T* row = x + r * stride + c;
            for_each_vec([&](int v, int64_t o) { a[v] += loadv(row + o); });
          }
          for_each_vec([&](int v, int64_t o) { std::memcpy(mean + c + o, &a[v], sizeof(vd)); });
        }
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
    for (int64_t q0 = r0; q0 < r1; q0 += chunk) {
      const int64_t q1 = std::min(r1, q0 + chunk);
      for (int64_t c = 0; c < blocked; c += kLanes) {
        if constexpr (!std::is_same_v<T, double>) fetch_next_chunk(q1, chunk, c);  // else cached
        vd center[kVecs], a2[kVecs], a1[kVecs];
        for_each_vec([&](int v, int64_t o) {
          center[v] = loadv(mean + c + o);
          a2[v] = q0 == r0 ? splat(0.0) : loadv(m2 + c + o);
          a1[v] = q0 == r0 ? splat(0.0) : loadv(corr + c + o);
        });
        for (int64_t r = q0; r < q1; ++r) {
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

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
