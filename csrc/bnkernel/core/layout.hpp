// Walks over one channel's values in the (outer, C, inner) layout: its contiguous runs, its rows.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// Calls f(pointer, length, next) on the contiguous runs holding values [j0, j1) of channel c, where
// a channel's j-th value is (o, i) = (j / inner, j % inner), and next is where the reading goes on
// after the run (see prefetch_run_ahead): the rest of its row when the run stops short of the row's
// end, else the channel's next row, else the first row of channel c + 1 (the channel that the
// fused kernels' tasks take next), else null.
template <typename T, class F>
inline void for_channel_runs(const T* base, Shape s, int64_t c, int64_t j0, int64_t j1, F&& f) {
  int64_t j = j0;
  while (j < j1) {
    const int64_t o = j / s.inner;
    const int64_t i = j - o * s.inner;
    const int64_t len = std::min(s.inner - i, j1 - j);
    const T* run = base + (o * s.channels + c) * s.inner + i;
    const T* next = nullptr;
    if (i + len < s.inner) {
      next = run + len;
    } else if (o + 1 < s.outer) {
      next = run + len + (s.channels - 1) * s.inner;
    } else if (c + 1 < s.channels) {
      next = base + (c + 1) * s.inner;
    }
    f(run, len, next);
    j += len;
  }
}

// Calls f(o, offset) for each of channel c's rows (planar pattern), offset = (o * C + c) * inner.
template <class F>
inline void for_channel_rows(Shape s, int64_t c, F&& f) {
  for (int64_t o = 0; o < s.outer; ++o) f((o * s.channels + c) * s.inner);
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
