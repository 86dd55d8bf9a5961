// The column windows of the interleaved reductions, shared among the threads when a row is wide.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bnkernel/core/parallel.hpp"
#include "bnkernel/core/tree.hpp"
#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

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

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
