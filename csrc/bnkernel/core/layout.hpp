// Walks over one channel's values in the (outer, C, inner) layout: its contiguous runs, its rows.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"

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

// Calls f(o, offset) for each of channel c's rows (planar pattern), offset = (o * C + c) * inner.
template <class F>
inline void for_channel_rows(Shape s, int64_t c, F&& f) {
  for (int64_t o = 0; o < s.outer; ++o) f((o * s.channels + c) * s.inner);
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
