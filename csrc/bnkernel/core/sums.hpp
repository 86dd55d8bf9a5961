// The backward's per-channel sums (sum dy, sum dy * (x - mean)): the leaf/merge operations for the
// deterministic tree (tree.hpp) and the drivers that pick a pattern per shape.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bnkernel/core/flags.hpp"
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
#include "bnkernel/simd/relu.hpp"
#include "bnkernel/simd/vectors.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

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
    Lanes sum_g, sum_gd;
    for_channel_runs(x, s, c, j0, j1, [&](const T* px, int64_t len, const T* next) {
      Lanes a = sum_g, b = sum_gd;  // see Lanes: the run's sums in registers
      auto add = [&](const vd* g, const auto* xs) {
        for_each_vec([&](int v, int64_t o) {
          a.v[v] += g[v];
          b.v[v] = fmav(g[v], loadv(xs + o) - vmean, b.v[v]);
        });
      };
      const int64_t at = px - x;
      const T* pdy = dy + at;
      const T* const next_dy = next ? dy + (next - x) : nullptr;  // dy's run where x's goes on
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        prefetch_run_ahead(pdy, i, len, next_dy, kLanes);
        prefetch_run_ahead(px, i, len, next, kLanes);
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
        int64_t q = 0;
        for (; q < rest; ++q) {
          const double g = Mask ? masked_dy(pdy[i + q], y[at + i + q]) : widen(pdy[i + q]);
          if (Mask && dres) dres[at + i + q] = narrow<T>(g);
          tail_dy[q] = g;
        }
        for (; q < kLanes; ++q) tail_dy[q] = 0.0;
        pad_tail(px + i, rest, mean, tail_x);
        vd g[kVecs];
        for_each_vec([&](int v, int64_t o) { g[v] = loadv(tail_dy + o); });
        add(g, tail_x);
      }
      sum_g = a;
      sum_gd = b;
    });
    const double sdy = sum_g.total();
    const double sdyd = sum_gd.total();
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
    double* __restrict__ sdy = out;
    double* __restrict__ sdyd = out + C;
    // channel blocks in registers down a chunk of rows, then the rest in memory, as in
    // InterleavedMoments
    const int64_t blocked = C - C % kLanes;
    const int64_t chunk = interleaved_chunk_rows(2);
    for (int64_t q0 = r0; q0 < r1; q0 += chunk) {
      const int64_t q1 = std::min(r1, q0 + chunk);
      const int64_t next_end = std::min(rows, q1 + chunk);
      for (int64_t c = 0; c < blocked; c += kLanes) {
        for (int64_t r = q1; r < next_end; ++r) {  // as in InterleavedMoments
          prefetch_l2(x + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
          prefetch_l2(dy + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
          if constexpr (Mask)
            prefetch_l2(y + r * stride + c, kLanes * static_cast<int64_t>(sizeof(T)));
        }
        vd mu[kVecs], a[kVecs], b[kVecs];
        for_each_vec([&](int v, int64_t o) {
          mu[v] = loadv(mean + c + o);
          a[v] = q0 == r0 ? splat(0.0) : loadv(sdy + c + o);
          b[v] = q0 == r0 ? splat(0.0) : loadv(sdyd + c + o);
        });
        for (int64_t r = q0; r < q1; ++r) {
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

// (sum dy, sum dy * (x - mean)) of every channel, likewise (see channel_moments, moments.hpp).
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
