// Host check of csrc/cuda/geometry.hpp (run by tests/test_cuda_geometry.py): every walk the CUDA
// kernels make over the (outer, C, inner) view against plain division, and every reduction
// partition covering each value exactly once.  Prints "ok <cases>" or the first mismatch.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/geometry.hpp"

namespace bc = bnkernel::cuda;

static int fail(const char* what, long long a, long long b, long long c) {
  std::printf("FAIL %s (%lld, %lld, %lld)\n", what, a, b, c);
  return 1;
}

int main() {
  long long cases = 0;
  const int64_t sizes[] = {1, 2, 3, 5, 7, 31, 32, 33, 49, 64, 255, 256, 257, 1000, 4099};
  // ChannelCursor: grid-stride walks of flat indices
  for (int64_t C : sizes) {
    for (int64_t inner : sizes) {
      const int64_t outer = 3;
      const int64_t total = outer * C * inner;
      const int64_t steps[] = {1, 7, 256, 256 * 37, total + 5};
      for (int64_t step : steps) {
        for (int64_t e0 = 0; e0 < total && e0 < 300; e0 += 13) {
          bc::ChannelCursor k(e0, step, C, inner);
          for (int n = 0; n < 40 && k.e < total; ++n, k.advance()) {
            const int64_t o = k.e / (inner * C);
            if (k.c != (k.e / inner) % C || k.i != k.e % inner || k.o != o ||
                k.position() != o * inner + k.e % inner) {
              return fail("ChannelCursor", C, inner, k.e);
            }
          }
          ++cases;
        }
      }
    }
  }
  // ValueCursor: a channel's values from a part's start, every stats thread's stride
  for (int64_t C : sizes) {
    for (int64_t inner : sizes) {
      const int64_t outer = 5;
      const int64_t m = outer * inner;
      for (int64_t j0 = 0; j0 < m && j0 < 600; j0 += 11) {
        for (int64_t step : {int64_t{256}, int64_t{1}, int64_t{3}}) {
          bc::ValueCursor v(j0, step, inner);
          const int64_t c = C - 1;
          for (; v.j < m; v.advance()) {
            const int64_t o = v.j / inner;
            const int64_t want = (o * C + c) * inner + (v.j - o * inner);
            if (v.address(c, C) != want) return fail("ValueCursor", C, inner, v.j);
          }
          ++cases;
        }
      }
    }
  }
  // part_range: the parts cut [0, m) into consecutive pieces
  for (int64_t m : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{65536}, int64_t{1000003}}) {
    for (int64_t parts : {int64_t{1}, int64_t{2}, int64_t{7}, int64_t{1024}}) {
      int64_t next = 0;
      for (int64_t p = 0; p < parts; ++p) {
        const bc::Range r = bc::part_range(m, parts, p);
        if (r.begin != next || r.end < r.begin) return fail("part_range", m, parts, p);
        next = r.end;
      }
      if (next != m) return fail("part_range end", m, parts, next);
      ++cases;
    }
  }
  // channels-last row tiles: every (row, channel) read by exactly one thread of one block
  for (int64_t C : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{7}, int64_t{16}, int64_t{31},
                    int64_t{32}, int64_t{33}, int64_t{64}, int64_t{100}, int64_t{513}}) {
    for (int64_t outer : {int64_t{1}, int64_t{9}, int64_t{100}, int64_t{1000}}) {
      for (int64_t parts : {int64_t{1}, int64_t{3}, int64_t{16}}) {
        const bc::RowTiles t = bc::row_tiles(C);
        std::vector<int> seen(static_cast<size_t>(outer * C), 0);
        for (int64_t tile = 0; tile < t.tiles; ++tile) {
          for (int64_t p = 0; p < parts; ++p) {
            const bc::Range r = bc::part_range(outer, parts, p);
            for (int w = 0; w < bc::kRowWarps; ++w) {
              for (int lane = 0; lane < 32; ++lane) {
                const bc::Lane l = bc::lane_of(t, lane);
                const int64_t c = tile * t.width + l.channel;
                if (!l.active || c >= C) continue;
                const int64_t stride = int64_t{bc::kRowWarps} * t.rows_per_warp;
                for (int64_t o = r.begin + int64_t{w} * t.rows_per_warp + l.row; o < r.end;
                     o += stride) {
                  ++seen[static_cast<size_t>(o * C + c)];
                }
              }
            }
          }
        }
        for (size_t k = 0; k < seen.size(); ++k) {
          if (seen[k] != 1) return fail("row tiles", C, outer, static_cast<long long>(k));
        }
        ++cases;
      }
    }
  }
  std::printf("ok %lld\n", cases);
  return 0;
}
