// Index arithmetic of the CUDA kernels on the (outer, C, inner) view, in plain C++ that both nvcc
// and the host compiler take: tests/test_cuda_geometry.py compiles geometry_test.cpp against it
// on the host (no GPU, no CUDA needed) and checks every walk against plain division.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BNK_HD __host__ __device__
#else
#define BNK_HD
#endif

namespace bnkernel::cuda {

// Flat indices e of the view, walked in steps of `step` (a grid-stride loop), with e's position
// (o, c, i) kept up to date by carries instead of 64-bit divisions per element:
//   e = (o * C + c) * inner + i,   step = (q * C + dc) * inner + di.
struct ChannelCursor {
  int64_t e, o, c, i;
  int64_t step, q, dc, di;
  int64_t C, inner;

  BNK_HD ChannelCursor(int64_t e0, int64_t step_, int64_t C_, int64_t inner_)
      : e(e0), step(step_), C(C_), inner(inner_) {
    const int64_t row = e0 / inner;  // o * C + c
    i = e0 - row * inner;
    o = row / C;
    c = row - o * C;
    const int64_t srow = step / inner;
    di = step - srow * inner;
    q = srow / C;
    dc = srow - q * C;
  }
  // the mask's index of e: o * inner + i
  BNK_HD int64_t position() const { return o * inner + i; }
  BNK_HD void advance() {
    e += step;
    i += di;
    int64_t carry = 0;
    if (i >= inner) {
      i -= inner;
      carry = 1;
    }
    c += dc + carry;  // < 2C: one subtraction is enough
    o += q;
    if (c >= C) {
      c -= C;
      ++o;
    }
  }
};

// A channel's values j = o * inner + i (the mask's index too), walked from j0 in steps of `step`,
// with the address (o * C + c) * inner + i kept by carries.
struct ValueCursor {
  int64_t j, o, i;
  int64_t step, dout, di;
  int64_t inner;

  BNK_HD ValueCursor(int64_t j0, int64_t step_, int64_t inner_)
      : j(j0), step(step_), inner(inner_) {
    o = j0 / inner;
    i = j0 - o * inner;
    dout = step / inner;
    di = step - dout * inner;
  }
  BNK_HD int64_t address(int64_t c, int64_t C) const { return (o * C + c) * inner + i; }
  BNK_HD void advance() {
    j += step;
    o += dout;
    i += di;
    if (i >= inner) {
      i -= inner;
      ++o;
    }
  }
};

// The part of a channel's m values that part p of `parts` covers: [begin, end).
struct Range {
  int64_t begin, end;
};
BNK_HD inline Range part_range(int64_t m, int64_t parts, int64_t p) {
  const int64_t len = (m + parts - 1) / parts;
  const int64_t begin = p * len < m ? p * len : m;
  const int64_t end = (p + 1) * len < m ? (p + 1) * len : m;
  return Range{begin, end};
}

// Channels-last (inner == 1) reductions read rows of C contiguous values: a block of kRowWarps
// warps takes a tile of up to 32 channels and reads it row after row, lanes across the channels
// (coalesced), `rows_per_warp` rows side by side in a warp when C < 32.
constexpr int kRowWarps = 8;
struct RowTiles {
  int64_t tiles;      // tiles of channels
  int width;          // channels a tile spans (the last tile may have fewer)
  int rows_per_warp;  // rows a warp reads at once
};
BNK_HD inline RowTiles row_tiles(int64_t C) {
  if (C >= 32) return RowTiles{(C + 31) / 32, 32, 1};
  const int w = static_cast<int>(C < 1 ? 1 : C);
  return RowTiles{1, w, 32 / w};
}
// Lane `lane` of a warp: its channel offset in the tile and its row offset, or active = false.
struct Lane {
  bool active;
  int channel;
  int row;
};
BNK_HD inline Lane lane_of(const RowTiles& t, int lane) {
  if (lane >= t.width * t.rows_per_warp) return Lane{false, 0, 0};
  return Lane{true, lane % t.width, lane / t.width};
}

}  // namespace bnkernel::cuda
