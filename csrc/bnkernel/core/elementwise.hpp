// The elementwise passes, for both memory patterns.  Everything is computed in double and rounded
// once to T at the store.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "bnkernel/core/flags.hpp"
#include "bnkernel/core/parallel.hpp"
#include "bnkernel/core/plan.hpp"
#include "bnkernel/core/prefetch.hpp"
#include "bnkernel/core/stores.hpp"
#include "bnkernel/core/tree.hpp"
#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"
#include "bnkernel/runtime/test_hooks.hpp"
#include "bnkernel/runtime/threads.hpp"
#include "bnkernel/runtime/workspace.hpp"
#include "bnkernel/simd/certified.hpp"
#include "bnkernel/simd/convert.hpp"
#include "bnkernel/simd/lanes.hpp"
#include "bnkernel/simd/relu.hpp"
#include "bnkernel/simd/vectors.hpp"

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

// out[j] = narrow<T>(value(j)) for j < len.  16-bit values go a block at a time through a buffer
// of doubles and the vector stores, whose conversion takes a third of the time of the scalar one
// (F16C, and AVX-512's rounding modes, which the vectorized scalar code cannot use).
template <typename T, class F>
inline void narrow_run(T* __restrict__ out, int64_t len, F&& value) {
  int64_t j = 0;
  if constexpr (is_half_v<T>) {
    constexpr int64_t kBlock = 8 * kVecLen;
    alignas(64) double buffer[kBlock];
    for (; j + kBlock <= len; j += kBlock) {
#pragma omp simd
      for (int64_t q = 0; q < kBlock; ++q) buffer[q] = value(j + q);
      for (int64_t q = 0; q < kBlock; q += kVecLen) storev(out + j + q, loadv(buffer + q));
    }
  }
  T* __restrict__ rest = out + j;
#pragma omp simd
  for (int64_t q = 0; q < len - j; ++q) rest[q] = narrow<T>(value(j + q));
}

// The runs a fused per-channel kernel reads next (another channel's, at the same offsets as the
// run being written): fetched into L2 a block at a time alongside the streamed writes, so that
// the next channel's reads overlap this one's writes.  Null: nothing to fetch.
template <typename T>
struct NextRuns {
  const T* a = nullptr;
  const T* b = nullptr;
};

// The streamed part of a run written to y: with `stream` (and streaming stores on this machine),
// the values before y's first kStreamAlign boundary get plain stores (value(i)), then every whole
// 256-byte block is filled by block(buffer, i) in an L1 buffer and copied out with streaming stores
// (the caller fences, see stream_fence in stores.hpp), `next` fetched alongside.  Returns where the
// caller's plain stores take over (0 without `stream`).  (The two pointers are read out of `next`
// and tested in the loop: a member function that did the same ran the streamed forward 15% slower
// here.)
template <typename T, class F, class B>
inline int64_t stream_blocks(T* __restrict__ y, int64_t len, bool stream, NextRuns<T> next,
                             F&& value, B&& block) {
  (void)stream;  // unused where there are no streaming stores
  const T* const next_a = next.a;
  const T* const next_b = next.b;
  (void)next_a;
  (void)next_b;
  int64_t i = 0;
  if constexpr (kStreamAlign > 0) {
    if (stream) {
      constexpr auto kSize = static_cast<int64_t>(sizeof(T));
      constexpr int64_t kBlock = 256 / kSize;  // 256 bytes a block (a multiple of kVecLen)
      const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(y) % kStreamAlign);
      // values up to the first aligned address get plain stores (all of them, if none is aligned)
      int64_t head = misaligned == 0 ? 0 : (kStreamAlign - misaligned) / kSize;
      if (misaligned % kSize != 0) head = len;
      head = std::min(head, len);
      for (; i < head; ++i) y[i] = narrow<T>(value(i));
      if (i + kBlock <= len) {
        alignas(64) T buffer[kBlock];
        for (; i + kBlock <= len; i += kBlock) {
          if (next_a) prefetch_values(next_a + i, kBlock);
          if (next_b) prefetch_values(next_b + i, kBlock);
          block(buffer, i, kBlock);
          for (int64_t b = 0; b < kBlock * kSize; b += kStreamAlign) {
            stream_block(reinterpret_cast<char*>(y + i) + b,
                         reinterpret_cast<const char*>(buffer) + b);
          }
        }
      }
    }
  }
  return i;
}

// y[i] = T(value(i)) for i < len, value computed in double; streamed as stream_blocks says.
template <typename T, class F>
inline void write_run(T* __restrict__ y, int64_t len, bool stream, F&& value,
                      NextRuns<T> next = {}) {
  const int64_t i =
      stream_blocks(y, len, stream, next, value, [&](T* buffer, int64_t at, int64_t n) {
        narrow_run(buffer, n, [&](int64_t j) { return value(at + j); });
      });
  narrow_run(y + i, len - i, [&](int64_t j) { return value(i + j); });
}

// ---- whole-array passes ------------------------------------------------------------------------

// out[k] = T(value(e + k, c)) for the n values from flat index e on, c being each value's channel.
// Walks the array's contiguous segments: a run of one channel (planar pattern), or a stretch of a
// row of C channels (interleaved), so the inner loops vectorize.
template <typename T, class F>
inline void fill_values(Shape s, int64_t e, int64_t n, T* __restrict__ out, F&& value) {
  int64_t k = 0;
  if (s.inner == 1) {
    int64_t c0 = e % s.channels;
    while (k < n) {
      const int64_t len = std::min(s.channels - c0, n - k);
      const int64_t base = e + k;
      narrow_run(out + k, len, [&](int64_t j) { return value(base + j, c0 + j); });
      k += len;
      c0 = 0;
    }
    return;
  }
  int64_t row = e / s.inner;
  int64_t i = e - row * s.inner;
  while (k < n) {
    const int64_t len = std::min(s.inner - i, n - k);
    const int64_t c = row % s.channels;
    const int64_t base = e + k;
    narrow_run(out + k, len, [&](int64_t j) { return value(base + j, c); });
    k += len;
    ++row;
    i = 0;
  }
}

// y[e] = T(value(e, channel of e)) over the whole array, in parallel over contiguous spans.  With
// streaming stores the spans are cut at aligned addresses, so that no cache line gets both plain
// and streaming stores except the array's first and last (mixing them on one line is slow).
//
// No software prefetch here: the spans are read front to back, which the hardware prefetchers
// follow, and asking for the inputs 2 KiB ahead into L2 made these passes slower, not faster
// (one thread, 32x256x56x56 float32 against a same-size copy, interleaved runs: normalize
// 3.3 -> 3.0-3.3 passes, backward dx 4.4 -> 3.6-4.0; channels-last 3.8 -> 3.7, 5.5 -> 4.8).
template <typename T, class F>
void elementwise(Shape s, T* y, int threads, F&& value) {
  const int64_t size = s.size();
  if (size == 0) return;
  const bool stream = stream_output(y, size);
  constexpr auto kSize = static_cast<int64_t>(sizeof(T));
  constexpr int64_t kSpan = 16384;  // elements per task
  constexpr int64_t kBlock = 256 / kSize;
  // first element at a 64-byte boundary (y is element-aligned when streamed, so one is reached)
  int64_t first = 0;
  if (stream) {
    const auto misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(y) % 64);
    first = std::min(size, ((64 - misaligned) % 64) / kSize);
  }
  const int64_t spans = 1 + ceil_div(size - first, kSpan);
  parallel_region(threads, [&] {
    alignas(64) T buffer[kBlock];
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int64_t t = 0; t < spans; ++t) {
      // span 0 is the unaligned head [0, first); span t > 0 starts at an aligned element
      const int64_t e0 = t == 0 ? 0 : first + (t - 1) * kSpan;
      const int64_t e1 = t == 0 ? first : std::min(size, e0 + kSpan);
      int64_t e = e0;
      if (stream && t > 0) {
        for (; e + kBlock <= e1; e += kBlock) {
          fill_values(s, e, kBlock, buffer, value);
          for (int64_t b = 0; b < kBlock * kSize; b += kStreamAlign) {
            stream_block(reinterpret_cast<char*>(y + e) + b,
                         reinterpret_cast<const char*>(buffer) + b);
          }
        }
      }
      if (e < e1) fill_values(s, e, e1 - e, y + e, value);
    }
    stream_fence(stream);
  });
}

// ---- interleaved pattern, channels in registers ----------------------------------------------
//
// With inner == 1 every row needs the coefficients of all C channels.  Loaded from memory for each
// value, they cost more loads than the data itself (three or four doubles a value), and at large C
// they no longer fit in L1 (48 KiB at C = 2048): the normalize of 32x7x7x2048 float32 ran at half
// the speed of C = 256.  Here a block of kLanes channels has its coefficients loaded into
// registers once per tile of kTileRows rows, and the tile's rows are walked under it; the few
// channels past the last full block go through the per-value path.  The arithmetic is the same as
// the per-value path's, operation for operation, so both give the same bits.
// A tile's rows are so many streams for the prefetchers to follow (times the arrays: x and y, or
// dy, x and dx): 4 rows ran the backward's dx 30% faster than 8 and the normalize as fast.
constexpr int64_t kTileRows = 4;

// fill(r0, r1, out) for the chunks [r0, r1) of chunk_rows rows of a channels-last array (rows of
// C values, contiguous in y), in parallel.  out is where row r0 goes: y itself, or with `stream`
// the calling thread's buffer, which is copied out with streaming stores after fill (stream_copy:
// whole lines streamed, the partial lines at a chunk's ends stored plainly, since blocks of
// channels do not start on line boundaries in general and a line must not get both kinds of
// store).  Each thread fences its streaming stores at the end.
template <typename T, class F>
void for_each_row_chunk(Shape s, T* y, int threads, bool stream, int64_t chunk_rows, F&& fill) {
  const int64_t C = s.channels;
  const int64_t rows = s.outer;
  const int64_t chunk_values = chunk_rows * C;
  Workspace ws;
  T* const chunk_buffers = stream ? ws.take<T>(threads * chunk_values) : nullptr;
  const int64_t chunks = ceil_div(rows, chunk_rows);
  parallel_region(threads, [&] {
    // (one thread: no region of its own, where an enclosing one's thread index would be wrong)
    const int slot = threads > 1 ? bnkernel::thread_index() : 0;
    T* const chunk_buffer = stream ? chunk_buffers + slot * chunk_values : nullptr;
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int64_t h = 0; h < chunks; ++h) {
      const int64_t r0 = h * chunk_rows;
      const int64_t r1 = std::min(rows, r0 + chunk_rows);
      fill(r0, r1, stream ? chunk_buffer : y + r0 * C);
      if (stream) stream_copy(y + r0 * C, chunk_buffer, (r1 - r0) * C);
    }
    stream_fence(stream);
  });
}

// The rows [chunk_r0, chunk_r1) of interleaved_blocks into out (row r at out + (r - chunk_r0) *
// C): tiles of kTileRows rows, a block of kLanes channels at a time with its coefficients in
// registers, then the channels past the last block value by value.  16-bit outputs try the
// op's certified float path first (simd/certified.hpp) where it has one.
template <typename T, class Op>
void fill_tiles(Shape s, T* y, bool stream, const Op& op_ref, int64_t chunk_r0, int64_t chunk_r1,
                T* out, CertifyRate<T>& rate_ref) {
  // 16-bit data work on a local copy of the op, which GCC then does not reload after every vector
  // store (see interleaved_rows); float32 and float64 keep the reference (one thread, medians of 7
  // interleaved runs, 32x7x7x2048: float16 normalize 946 -> 782 us, training forward 1687 -> 1534;
  // float32 normalize 838 -> 878 with the copy, so not there)
  std::conditional_t<is_half_v<T>, const Op, const Op&> op = op_ref;
  const int64_t C = s.channels;
  const int64_t rows = s.outer;
  const int64_t blocked = C - C % kLanes;
  constexpr auto kSize = static_cast<int64_t>(sizeof(T));
  CertifyRate<T> rate = rate_ref;  // the thread's, over its chunks (in a local here)
  for (int64_t r0 = chunk_r0; r0 < chunk_r1; r0 += kTileRows) {
    const int64_t r1 = std::min(chunk_r1, r0 + kTileRows);
    const int64_t next_end = std::min(rows, r1 + kTileRows);
    for (int64_t c = 0; c < blocked; c += kLanes) {
      // the same columns of the next tile, inputs and (unless streamed) output, while this tile
      // is computed (see prefetch_l2).  Without the output's, the tile order defeats the hardware
      // prefetcher for the write-allocate reads when a page holds a few rows (C = 128..512
      // float32 ran at 2/3 the speed of the per-value path; with it, level).
      for (int64_t r = r1; r < next_end; ++r) {
        op.prefetch(r * C + c, kLanes);
        if (!stream) prefetch_l2_write(y + r * C + c, kLanes * kSize);
      }
      const auto k = op.coef(c);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e = r * C + c;
        T* const dst = out + (r - chunk_r0) * C + c;
        for_each_vec([&](int v, int64_t o) {
          if constexpr (is_half_v<T>) {
            if (op.f32 && rate.on) {
              ++rate.attempts;
              if (op.certified(dst + o, e + o, c + o)) return;
              rate.fail(rate.attempts);
            }
          }
          storev(dst + o, op.apply(k, v, e + o));
        });
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      T* __restrict__ dst = out + (r - chunk_r0) * C;
#pragma omp simd
      for (int64_t c = blocked; c < C; ++c) dst[c] = narrow<T>(op.value(r * C + c, c));
    }
  }
  rate_ref = rate;
}

// Op provides
//   static constexpr int64_t kCoefficients;       // doubles of coefficients per channel
//   Coef coef(int64_t c) const;                  // the coefficients of channels [c, c + kLanes)
//   vd apply(const Coef& k, int v, int64_t e) const;  // vector v of the block at flat index e
//   vd at(int64_t e, int64_t c) const;           // kVecLen values at e, channels [c, c + kVecLen)
//   double value(int64_t e, int64_t c) const;    // one value (the channels past the last block)
//   void prefetch(int64_t e, int64_t count) const;  // inputs [e, e + count) towards L2
//   const float* f32;                            // 16-bit data: the float coefficients, or null
//   bool certified(T* dst, int64_t e, int64_t c) const;  // at(e, c) stored from float arithmetic
//                                                // when certified (false: nothing stored)
template <typename T, class Op>
void interleaved_blocks(Shape s, T* y, int threads, const Op& op) {
  const int64_t C = s.channels;
  const bool stream = stream_output(y, s.size());
  // streamed, the tiles are grouped in chunks of at least kStreamChunk values, so that few of the
  // lines written are partial ones at a chunk's ends (with C = 64 a tile is only 1 KiB)
  constexpr int64_t kStreamChunk = 4096;
  const int64_t chunk_rows =
      stream ? kTileRows * ceil_div(kStreamChunk, kTileRows * std::max<int64_t>(C, 1)) : kTileRows;
  // the certified path's success rate, per thread over its chunks (a chunk of 4 rows of 64
  // channels is only 32 vectors)
  Workspace ws;
  CertifyRate<T>* const rates = ws.take<CertifyRate<T>>(threads);
  for (int t = 0; t < threads; ++t) rates[t] = CertifyRate<T>{};
  for_each_row_chunk(s, y, threads, stream, chunk_rows,
                     [&](int64_t chunk_r0, int64_t chunk_r1, T* out) {
                       CertifyRate<T>& rate = rates[threads > 1 ? bnkernel::thread_index() : 0];
                       fill_tiles(s, y, stream, op, chunk_r0, chunk_r1, out, rate);
                     });
}

// Coefficient bytes per row up to which the per-value path keeps them in L1 (half of a 32 KiB L1d):
// it reads the rows front to back, the pattern the hardware prefetchers follow best, and ran
// channels-last arrays past the caches with C = 64..256 faster than the register blocks did
// (two threads, 32x56x56x64 float32: forward 2.6 against 3.7 ms, backward 4.9 against 6.0 ms).
constexpr int64_t kCoefficientBytesInL1 = 16 << 10;

// Coefficient bytes per row up to which channels-last rows go a vector of channels at a time
// (interleaved_rows): all that the register blocks leave.  (It was 8 KiB, the rows having been
// slower than the per-value path at 16 KiB while GCC reloaded the op on every vector; since
// interleaved_rows keeps the op in locals they are faster there too.  float32, medians of 5-7
// interleaved runs, one thread / two: 32x28x28x512 normalize 6.0 -> 3.3 / 2.7 -> 2.1 ms, training
// forward 8.6 -> 5.9 / 4.1 -> 3.9, backward 15.1 -> 11.7 / 8.8 -> 7.4; 32x28x28x384 backward
// 11.6 -> 7.1 / 6.4 -> 4.6; 32x28x28x640 normalize 7.2 -> 4.3 / 4.1 -> 3.1.)
constexpr int64_t kCoefficientBytesForRows = kCoefficientBytesInL1;

// The channels-last pattern with few coefficients: each row's values a vector of channels at a
// time (op.at: the coefficients loaded as vectors from L1), the channels past the last whole
// vector value by value (op.value, the same arithmetic), into a per-thread buffer of a chunk of
// rows that is streamed out (stream_copy) when the output is.  Faster than the flat spans of
// elementwise(), whose 256-byte blocks each paid for finding their place in the rows: one
// thread, 98 MiB float32, passes of a same-size copy, medians of interleaved runs: backward dx
// C = 64 5.2-5.5 -> 4.3-4.9, C = 256 6.6-7.1 -> 4.3-5.1; normalize level (3.3-4.4 either way).
template <typename T, class Op>
void interleaved_rows(Shape s, T* y, int threads, const Op& op) {
  const int64_t C = s.channels;
  const int64_t whole = C - C % kVecLen;
  // a chunk of at least 256 values (1 KiB of float32: 2 KiB and 4 KiB chunks ran slower)
  constexpr int64_t kChunkValues = 256;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkValues / std::max<int64_t>(C, 1));
  auto fill = [&](int64_t r0, int64_t r1, T* out) {
    // local copies of the op and the bounds: the vector stores (through may_alias types) could
    // write to them for all the compiler knows, and GCC reloaded every pointer of the op through
    // the closure on every vector (float32 normalize, one thread, 32x56x56x256: 9.2 -> 7.9 ms,
    // 32x56x56x64: 2.5 -> 2.0 ms, medians of 5 interleaved runs)
    const Op o = op;
    const int64_t n = C, w = whole;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e = r * n;
      T* const dst = out + (r - r0) * n;  // (may be x itself: an in-place call)
      for (int64_t c = 0; c < w; c += kVecLen) storev(dst + c, o.at(e + c, c));
      for (int64_t c = w; c < n; ++c) dst[c] = narrow<T>(o.value(e + c, c));
    }
  };
  for_each_row_chunk(s, y, threads, stream_output(y, s.size()), chunk_rows, fill);
}

// The interleaved pattern goes by register blocks when a row's coefficients would crowd L1, or
// the data are 16-bit (the blocks convert a vector at a time, see vector_run), and there is at
// least one whole block; by rows a vector at a time when its coefficients are few; everything
// else (the planar pattern, and the middle ground) by contiguous spans.
template <typename T, class Op>
void elementwise_op(Shape s, T* y, int threads, const Op& op) {
  const int64_t coefficient_bytes = Op::kCoefficients * int64_t{8} * s.channels;
  if (s.inner == 1 && s.channels >= kLanes && s.outer > 0 &&
      (is_half_v<T> || coefficient_bytes > kCoefficientBytesInL1)) {
    interleaved_blocks(s, y, threads, op);
  } else if (s.inner == 1 && s.channels >= kVecLen && s.outer > 0 && !is_half_v<T> &&
             coefficient_bytes <= kCoefficientBytesForRows) {
    // (16-bit data never come here; the constexpr test keeps the rows path from being compiled
    // for them at all)
    if constexpr (!is_half_v<T>) interleaved_rows(s, y, threads, op);
  } else {
    elementwise(s, y, threads, [&](int64_t e, int64_t c) { return op.value(e, c); });
  }
}

// y = (x - mean[c]) * scale[c] + shift[c].
//
// (x - mean) first, not x * scale + (shift - mean * scale): when |mean| >> std the folded form
// cancels catastrophically, while x - mean is exact or nearly so.  Where the instruction set has
// a fused multiply-add (the AVX2 and AVX-512 copies) it is used explicitly: one rounding fewer,
// and 10-15% faster on cache-resident data; the baseline copy rounds twice.
template <typename T>
inline double affine_value(T x, double mean, double scale, double shift) {
#if defined(__FMA__)
  return __builtin_fma(widen(x) - mean, scale, shift);
#else
  return (widen(x) - mean) * scale + shift;
#endif
}

// ---- 16-bit outputs certified from float arithmetic (see simd/certified.hpp) -----------------
//
// Each op's float arithmetic and its error bound, err >= |y - exact| with a factor of at least two
// to spare, where u = 2^-24 is a float rounding's relative error and every coefficient's float is
// within u of its double (float_coefficient).  The per-channel terms of each bound are computed
// in double and rounded up (bound_up); they are the op's "float coefficients", made once per call
// (or run) by *_floats, which return false where a coefficient cannot be certified: the call (or
// run) then takes the double path alone.  kFloatCoefficients is how many a channel has.

// affine: y1 = fma(x - m, s, b) [+ r].  Its error: u|m s| (m's rounding), 2u|d s| (d = x - m's
// rounding and s's), u|b|, u|y1| (the fma's), plus u|y1| for the rounding of y1 -/+ err: with
// |d s| <= |y1| + |b| (1 + u), at most 4.1u|y1| + 1.1u|m s| + 3.1u|b|.  The bound:
// err = 8u |y1| + 8u (|m s| + |b|) + floor (1 + |s|) (an underflow in d costs |s| times its
// error, one in y1 its own); a residual adds u|y|, bound 8u |y|.
constexpr int kAffineFloats = 4;  // m, s, b, the constant term of err
inline bool affine_floats(double mean, double scale, double shift, float* f) {
  f[3] = bound_up(2 * kCertifyFactor * (std::fabs(mean * scale) + std::fabs(shift)) +
                  kUnderflowFloor * (2 + std::fabs(scale)));
  return float_coefficient(mean, f[0]) & float_coefficient(scale, f[1]) &
         float_coefficient(shift, f[2]);
}

// the training dx: d = x - m, u1 = fma(-d, kx, g - kd), dx = ks u1.  Its error (t = g - kd):
// u|ks| (|kd| + |t| + 2|d kx| + |m kx|) from the roundings inside u1, u|ks u1| from u1's and
// 2u|ks u1| from ks's and the product's, u|dx| for err's ends; with |t| <= |u1| + |d kx|, at most
// 1.05u |ks| (|kd| + |m kx| + 3|d||kx| + 5|u1|).  The bound: err = |d| a + |u1| b + k with
// a = 12u |ks kx|, b = 20u |ks|, k = 4u |ks| (|kd| + |m kx|) + floor (1 + |ks| (3 + 2|kx|))
// (underflows in d, g - kd, u1 and dx).
constexpr int kGradFloats = 7;  // m, ks, kd, kx, a, b, k
inline bool grad_floats(double mean, double k_scale, double k_dy, double k_x, float* f) {
  const double ks = std::fabs(k_scale), kx = std::fabs(k_x);
  f[4] = bound_up(3 * kCertifyFactor * ks * kx);
  f[5] = bound_up(5 * kCertifyFactor * ks);
  f[6] = bound_up(kCertifyFactor * ks * (std::fabs(k_dy) + std::fabs(mean * k_x)) +
                  kUnderflowFloor * (1 + ks * (3 + 2 * kx)));
  return float_coefficient(mean, f[0]) & float_coefficient(k_scale, f[1]) &
         float_coefficient(k_dy, f[2]) & float_coefficient(k_x, f[3]);
}

// the frozen dx = g ks: u|g ks| from ks, u|dx| from the product, u|dx| for the ends: about 3u|dx|.
// The bound: err = 8u |dx| + floor (1 + |ks|), without the absolute term where g = 0 (exactly
// zero then, in both paths).
constexpr int kScaleFloats = 2;  // ks, the constant term of err
inline bool scale_floats(double k_scale, float* f) {
  f[1] = bound_up(kUnderflowFloor * (1 + std::fabs(k_scale)));
  return float_coefficient(k_scale, f[0]);
}

// The float coefficients of every channel, as kFloats arrays of C (array j at f + j * C), made by
// make(c, out) into a workspace; null where the instruction set has no certified path or the
// tests turned it off.  A channel whose coefficients cannot be certified gets a NaN for its last
// one, the constant term of its bound, which every op adds into err: its vectors all fail the
// test and take the double path, and the other channels keep theirs.
template <int kFloats, class Make>
inline const float* channel_floats(Workspace& ws, int64_t C, Make&& make) {
  if (!BNKERNEL_CERTIFIED16 || !certify_16bit_outputs()) return nullptr;
  float* f = ws.take<float>(kFloats * C);
  for (int64_t c = 0; c < C; ++c) {
    float one[kFloats];
    if (!make(c, one)) one[kFloats - 1] = std::numeric_limits<float>::quiet_NaN();
    for (int j = 0; j < kFloats; ++j) f[j * C + c] = one[j];
  }
  return f;
}

#if BNKERNEL_CERTIFIED16
template <bool Residual, bool Relu, typename T>
inline bool affine_certified(T* dst, const T* x, const T* residual, vf m, vf s, vf b, vf k) {
  constexpr auto k8u = static_cast<float>(2 * kCertifyFactor);
  const vf y1 = fmaf_v(loadf(x) - m, s, b);
  if constexpr (Residual) {
    const vf y = y1 + loadf(residual);
    return store_certified<Relu>(dst, y, fmaf_v(absf(y1) + absf(y), splatf(k8u), k));
  } else {
    return store_certified<Relu>(dst, y1, fmaf_v(absf(y1), splatf(k8u), k));
  }
}
template <bool Mask, typename T>
inline bool grad_certified(T* dst, const T* dy, const T* x, const T* y, vf m, vf ks, vf kd, vf kx,
                           vf a, vf b, vf k) {
  vf g = loadf(dy);
  if constexpr (Mask) g = masked_f(g, loadf(y));
  const vf d = loadf(x) - m;
  const vf u1 = fmaf_v(-d, kx, g - kd);
  return store_certified(dst, ks * u1, fmaf_v(absf(d), a, fmaf_v(absf(u1), b, k)));
}
template <bool Mask, typename T>
inline bool scale_certified(T* dst, const T* dy, const T* y, vf ks, vf k) {
  constexpr auto k8u = static_cast<float>(2 * kCertifyFactor);
  vf g = loadf(dy);
  if constexpr (Mask) g = masked_f(g, loadf(y));
  const vf dx = g * ks;
  // a zero g (the ReLU mask's, or a zero dy) gives an exact zero, with the sign the double path
  // gives it: no bound there (the absolute term would send every masked vector the double way)
  const vf floor = reinterpret_cast<vf>(reinterpret_cast<vi>(k) & (g != splatf(0.0f)));
  return store_certified(dst, dx, fmaf_v(absf(dx), splatf(k8u), floor));
}
#endif

// ---- fusion flags ------------------------------------------------------------------------------
//
// The epilogue of the forward (a residual added, a ReLU) and the ReLU mask of the backward are
// compile-time flags of the ops, so the plain kernels carry no test for them.

// y = epilogue((x - mean[c]) * scale[c] + shift[c])
template <typename T, bool Residual, bool Relu>
struct AffineOp {
  static constexpr int64_t kCoefficients = 3;
  const T* x;
  const double* mean;
  const double* scale;
  const double* shift;
  const T* residual;
  const float* f32 = nullptr;  // 16-bit data: kAffineFloats arrays of C (channel_floats), or null
  int64_t channels = 0;
  struct Coef {
    vd mean[kVecs], scale[kVecs], shift[kVecs];
  };
  Coef coef(int64_t c) const {
    Coef k;
    for_each_vec([&](int v, int64_t o) {
      k.mean[v] = loadv(mean + c + o);
      k.scale[v] = loadv(scale + c + o);
      k.shift[v] = loadv(shift + c + o);
    });
    return k;
  }
  vd apply(const Coef& k, int v, int64_t e) const {
    return at(e, k.mean[v], k.scale[v], k.shift[v]);
  }
  // the kVecLen values from flat index e, of channels [c, c + kVecLen)
  vd at(int64_t e, int64_t c) const {
    return at(e, loadv(mean + c), loadv(scale + c), loadv(shift + c));
  }
  vd at(int64_t e, vd m, vd k, vd b) const {
    vd r = fmav(loadv(x + e) - m, k, b);
    if constexpr (Residual) r += loadv(residual + e);
    if constexpr (Relu) r = relu_vec(r);
    return r;
  }
  double value(int64_t e, int64_t c) const {
    double r = affine_value(x[e], mean[c], scale[c], shift[c]);
    if constexpr (Residual) r += widen(residual[e]);
    if constexpr (Relu) r = relu_value(r);
    return r;
  }
  void prefetch(int64_t e, int64_t count) const {
    prefetch_values(x + e, count);
    if constexpr (Residual) prefetch_values(residual + e, count);
  }
  bool certified(T* dst, int64_t e, int64_t c) const {
#if BNKERNEL_CERTIFIED16
    const float* f = f32 + c;
    const int64_t C = channels;
    return affine_certified<Residual, Relu>(dst, x + e, Residual ? residual + e : nullptr, loadf(f),
                                            loadf(f + C), loadf(f + 2 * C), loadf(f + 3 * C));
#else
    (void)dst, (void)e, (void)c;
    return false;
#endif
  }
};

// ---- 16-bit runs -------------------------------------------------------------------------------
//
// Value by value, 16-bit data are widened and narrowed by integer code, at several times the cost
// of the vector conversions (F16C, AVX-512's rounding modes), which the compiler cannot use for
// them.  The per-channel runs of 16-bit data are therefore computed a vector at a time: vec(i) is
// values [i, i + kVecLen) as a vector, computed with the same arithmetic as scalar(i) (see fmav),
// so the two give the same bits and the run's ends may take either.  Streaming as write_run.
// cert(p, i) stores vector i at p from float arithmetic when certified (simd/certified.hpp) and
// says whether it did; vec(i) is the double path that takes the vectors it does not.
template <typename T, class V, class S, class Cert>
inline void vector_run(T* __restrict__ y, int64_t len, bool stream, V&& vec, S&& scalar,
                       Cert&& cert, NextRuns<T> next = {}) {
  CertifyRate<T> rate;  // (the run's; vector i is attempt i / kVecLen + 1)
  auto put = [&](T* p, int64_t i) {
    if (rate.on) {
      if (cert(p, i)) return;
      rate.fail(i / kVecLen + 1);
    }
    storev(p, vec(i));
  };
  int64_t i = stream_blocks(y, len, stream, next, scalar, [&](T* buffer, int64_t at, int64_t n) {
    for (int64_t j = 0; j < n; j += kVecLen) put(buffer + j, at + j);
  });
  for (; i + kVecLen <= len; i += kVecLen) put(y + i, i);
  for (; i < len; ++i) y[i] = narrow<T>(scalar(i));
}

// one channel's contiguous run (the fused per-channel kernels); residual at the same offset. 16-bit
// data a vector at a time (vector_run), the rest value by value (write_run): the same arithmetic.
template <typename T>
inline void affine_run(const T* __restrict__ x, T* __restrict__ y, int64_t len, double mean,
                       double scale, double shift, bool stream, const T* residual, bool relu,
                       NextRuns<T> next = {}) {
  with_flags(residual != nullptr, relu, [&](auto res, auto act) {
    auto value = [&](int64_t i) {
      double r = affine_value(x[i], mean, scale, shift);
      if constexpr (decltype(res)::value) r += widen(residual[i]);
      if constexpr (decltype(act)::value) r = relu_value(r);
      return r;
    };
    if constexpr (!is_half_v<T>) {
      write_run(y, len, stream, value, next);
    } else {
      const vd vmean = splat(mean), vscale = splat(scale), vshift = splat(shift);
      auto vec = [&](int64_t i) {
        vd r = fmav(loadv(x + i) - vmean, vscale, vshift);
        if constexpr (decltype(res)::value) r += loadv(residual + i);
        if constexpr (decltype(act)::value) r = relu_vec(r);
        return r;
      };
#if BNKERNEL_CERTIFIED16
      float f[kAffineFloats] = {};
      const bool certify = certify_16bit_outputs() && affine_floats(mean, scale, shift, f);
      const vf fm = splatf(f[0]), fs = splatf(f[1]), fb = splatf(f[2]), fk = splatf(f[3]);
      auto cert = [&](T* p, int64_t i) {
        return certify &&
               affine_certified<decltype(res)::value, decltype(act)::value>(
                   p, x + i, decltype(res)::value ? residual + i : nullptr, fm, fs, fb, fk);
      };
#else
      auto cert = [&](T*, int64_t) { return false; };
#endif
      vector_run(y, len, stream, vec, value, cert, next);
    }
  });
}

// run(c, offset, stream) for every run of the planar pattern (channel c's inner values from
// offset), in parallel: how 16-bit planar data go through the whole-array passes, a vector of
// conversions at a time as the fused kernels do (affine_run, grad_run, scale_run).  (Rows under
// 4 KiB keep plain stores here, as before: streaming them was measured only for the fused kernels'
// float32 runs.)
template <typename T, class Run>
void planar_runs(Shape s, T* y, int threads, Run&& run) {
  const bool stream =
      stream_channel_runs(y, s) && s.inner * static_cast<int64_t>(sizeof(T)) >= 4096;
  const int64_t rows = s.outer * s.channels;
  parallel_region(threads, [&] {
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int64_t r = 0; r < rows; ++r) run(r % s.channels, r * s.inner, stream);
    stream_fence(stream);
  });
}

// y = epilogue((x - mean[c]) * scale[c] + shift[c]) over the whole array.  16-bit planar data go
// a channel's run at a time (planar_runs), everything else through elementwise_op; 16-bit
// interleaved data with their float coefficients (channel_floats) for the certified path.
template <typename T>
void affine(const T* x, Shape s, const double* mean, const double* scale, const double* shift, T* y,
            int threads, Epilogue<T> ep) {
  Workspace ws;
  const float* f32 = nullptr;
  if constexpr (is_half_v<T>) {
    if (s.inner > 1) {
      planar_runs(s, y, threads, [&](int64_t c, int64_t offset, bool stream) {
        affine_run(x + offset, y + offset, s.inner, mean[c], scale[c], shift[c], stream,
                   ep.residual ? ep.residual + offset : nullptr, ep.relu);
      });
      return;
    }
    f32 = channel_floats<kAffineFloats>(ws, s.channels, [&](int64_t c, float* f) {
      return affine_floats(mean[c], scale[c], shift[c], f);
    });
  }
  with_flags(ep.residual != nullptr, ep.relu, [&](auto res, auto relu) {
    elementwise_op(s, y, threads,
                   AffineOp<T, decltype(res)::value, decltype(relu)::value>{
                       x, mean, scale, shift, ep.residual, f32, s.channels});
  });
}

// Training backward, per channel, with k_scale = gamma * invstd, k_dy = sum_dy / m and
// k_x = invstd * sum_dy_xhat / m:
//   dx = k_scale * (g - k_dy - (x - mean) * k_x),   g = dy, or masked_dy(dy, y) under a ReLU
inline double grad_value(double g, double x, double mean, double k_scale, double k_dy, double k_x) {
  const double d = x - mean;
#if defined(__FMA__)
  return k_scale * __builtin_fma(-d, k_x, g - k_dy);
#else
  return k_scale * (g - k_dy - d * k_x);
#endif
}

// grad_value on a vector (d = x - mean), with the same arithmetic
inline vd grad_vec(vd g, vd d, vd k_scale, vd k_dy, vd k_x) {
#if defined(__FMA__)
  return k_scale * fmav(-d, k_x, g - k_dy);
#else
  return k_scale * (g - k_dy - d * k_x);
#endif
}

template <typename T, bool Mask>
struct GradOp {
  static constexpr int64_t kCoefficients = 4;
  const T* dy;
  const T* x;
  const T* y;  // the forward's output, for the ReLU mask
  const double* mean;
  const double* k_scale;
  const double* k_dy;
  const double* k_x;
  static constexpr const float* f32 = nullptr;  // no certified path (see grad())
  struct Coef {
    vd mean[kVecs], k_scale[kVecs], k_dy[kVecs], k_x[kVecs];
  };
  Coef coef(int64_t c) const {
    Coef k;
    for_each_vec([&](int v, int64_t o) {
      k.mean[v] = loadv(mean + c + o);
      k.k_scale[v] = loadv(k_scale + c + o);
      k.k_dy[v] = loadv(k_dy + c + o);
      k.k_x[v] = loadv(k_x + c + o);
    });
    return k;
  }
  vd apply(const Coef& k, int v, int64_t e) const {
    return at(e, k.mean[v], k.k_scale[v], k.k_dy[v], k.k_x[v]);
  }
  vd at(int64_t e, int64_t c) const {
    return at(e, loadv(mean + c), loadv(k_scale + c), loadv(k_dy + c), loadv(k_x + c));
  }
  vd at(int64_t e, vd m, vd ks, vd kd, vd kx) const {
    const vd d = loadv(x + e) - m;
    vd g = loadv(dy + e);
    if constexpr (Mask) g = masked_vec(g, loadv(y + e));
    return grad_vec(g, d, ks, kd, kx);
  }
  double value(int64_t e, int64_t c) const {
    const double g = Mask ? masked_dy(dy[e], y[e]) : widen(dy[e]);
    return grad_value(g, widen(x[e]), mean[c], k_scale[c], k_dy[c], k_x[c]);
  }
  void prefetch(int64_t e, int64_t count) const {
    prefetch_values(dy + e, count);
    prefetch_values(x + e, count);
    if constexpr (Mask) prefetch_values(y + e, count);
  }
  // no certified path (see grad())
  bool certified(T*, int64_t, int64_t) const { return false; }
};

// the training dx of one channel's contiguous run (the fused per-channel backward), as affine_run
template <typename T>
inline void grad_run(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,
                     T* __restrict__ dx, int64_t len, double mean, double k_scale, double k_dy,
                     double k_x, bool stream, NextRuns<T> next = {}) {
  with_flag(y != nullptr, [&](auto mask) {
    constexpr bool kMask = decltype(mask)::value;
    auto value = [&](int64_t i) {
      const double g = kMask ? masked_dy(dy[i], y[i]) : widen(dy[i]);
      return grad_value(g, widen(x[i]), mean, k_scale, k_dy, k_x);
    };
    if constexpr (!is_half_v<T>) {
      write_run(dx, len, stream, value, next);
    } else {
      const vd vmean = splat(mean), vk_scale = splat(k_scale), vk_dy = splat(k_dy),
               vk_x = splat(k_x);
      auto vec = [&](int64_t i) {
        vd g = loadv(dy + i);
        if constexpr (kMask) g = masked_vec(g, loadv(y + i));
        return grad_vec(g, loadv(x + i) - vmean, vk_scale, vk_dy, vk_x);
      };
#if BNKERNEL_CERTIFIED16
      float f[kGradFloats] = {};
      const bool certify = certify_16bit_outputs() && grad_floats(mean, k_scale, k_dy, k_x, f);
      const vf fm = splatf(f[0]), fks = splatf(f[1]), fkd = splatf(f[2]), fkx = splatf(f[3]),
               fa = splatf(f[4]), fb = splatf(f[5]), fk = splatf(f[6]);
      auto cert = [&](T* p, int64_t i) {
        return certify && grad_certified<kMask>(p, dy + i, x + i, kMask ? y + i : nullptr, fm, fks,
                                                fkd, fkx, fa, fb, fk);
      };
#else
      auto cert = [&](T*, int64_t) { return false; };
#endif
      vector_run(dx, len, stream, vec, value, cert, next);
    }
  });
}

// the training dx over the whole array (as affine: 16-bit planar data a run at a time)
template <typename T>
void grad(const T* dy, const T* x, const T* y, Shape s, const double* mean, const double* k_scale,
          const double* k_dy, const double* k_x, T* dx, int threads) {
  if constexpr (is_half_v<T>) {
    if (s.inner > 1) {
      planar_runs(s, dx, threads, [&](int64_t c, int64_t offset, bool stream) {
        grad_run(dy + offset, x + offset, y ? y + offset : nullptr, dx + offset, s.inner, mean[c],
                 k_scale[c], k_dy[c], k_x[c], stream);
      });
      return;
    }
  }
  // (interleaved 16-bit data keep the double path for dx, GradOp having no certified one: with
  // seven float coefficients to load a vector beside the three of data, it ran the channels-last
  // backward 5-14% slower, one thread, 32x56x56x64 and 32x7x7x2048 float16)
  with_flag(y != nullptr, [&](auto mask) {
    elementwise_op(s, dx, threads,
                   GradOp<T, decltype(mask)::value>{dy, x, y, mean, k_scale, k_dy, k_x});
  });
}

// The training dx under a mask over the positions (one byte per (o, i) at o * inner + i, nonzero
// where valid): valid positions as grad (the same arithmetic, so the same bits), padded ones the
// direct term g * k_scale[c] alone (the statistics do not depend on them).  A planar run is cut
// where the mask changes; an interleaved row is one position.
template <typename T, bool Mask>
void masked_grad_impl(const T* dy, const T* x, const T* y, const uint8_t* valid, Shape s,
                      const double* mean, const double* k_scale, const double* k_dy,
                      const double* k_x, T* dx, int threads) {
  auto g_of = [&](int64_t e) { return Mask ? masked_dy(dy[e], y[e]) : widen(dy[e]); };
  const int64_t C = s.channels;
  if (s.inner == 1) {
    parallel_region(threads, [&] {
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t r = 0; r < s.outer; ++r) {
        const int64_t e0 = r * C;
        if (valid[r] != 0) {
          narrow_run(dx + e0, C, [&](int64_t c) {
            return grad_value(g_of(e0 + c), widen(x[e0 + c]), mean[c], k_scale[c], k_dy[c], k_x[c]);
          });
        } else {
          narrow_run(dx + e0, C, [&](int64_t c) { return g_of(e0 + c) * k_scale[c]; });
        }
      }
    });
    return;
  }
  const int64_t runs = s.outer * C;
  parallel_region(threads, [&] {
#if BNKERNEL_HAVE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t q = 0; q < runs; ++q) {
      const int64_t c = q % C;
      const uint8_t* m = valid + (q / C) * s.inner;
      for (int64_t i = 0; i < s.inner;) {
        const bool v = m[i] != 0;
        int64_t j = i + 1;
        while (j < s.inner && (m[j] != 0) == v) ++j;
        const int64_t e0 = q * s.inner + i;
        if (v) {
          narrow_run(dx + e0, j - i, [&](int64_t k) {
            return grad_value(g_of(e0 + k), widen(x[e0 + k]), mean[c], k_scale[c], k_dy[c], k_x[c]);
          });
        } else {
          narrow_run(dx + e0, j - i, [&](int64_t k) { return g_of(e0 + k) * k_scale[c]; });
        }
        i = j;
      }
    }
  });
}

template <typename T>
void masked_grad(const T* dy, const T* x, const T* y, const uint8_t* valid, Shape s,
                 const double* mean, const double* k_scale, const double* k_dy, const double* k_x,
                 T* dx, int threads) {
  with_flag(y != nullptr, [&](auto mask) {
    masked_grad_impl<T, decltype(mask)::value>(dy, x, y, valid, s, mean, k_scale, k_dy, k_x, dx,
                                               threads);
  });
}

// Frozen statistics: dx = g * k_scale[c].
template <typename T, bool Mask>
struct ScaleOp {
  static constexpr int64_t kCoefficients = 1;
  const T* dy;
  const T* y;
  const double* k_scale;
  const float* f32 = nullptr;  // 16-bit data: kScaleFloats arrays of C (channel_floats), or null
  int64_t channels = 0;
  struct Coef {
    vd k_scale[kVecs];
  };
  Coef coef(int64_t c) const {
    Coef k;
    for_each_vec([&](int v, int64_t o) { k.k_scale[v] = loadv(k_scale + c + o); });
    return k;
  }
  vd apply(const Coef& k, int v, int64_t e) const { return at(e, k.k_scale[v]); }
  vd at(int64_t e, int64_t c) const { return at(e, loadv(k_scale + c)); }
  vd at(int64_t e, vd ks) const {
    vd g = loadv(dy + e);
    if constexpr (Mask) g = masked_vec(g, loadv(y + e));
    return g * ks;
  }
  double value(int64_t e, int64_t c) const {
    const double g = Mask ? masked_dy(dy[e], y[e]) : widen(dy[e]);
    return g * k_scale[c];
  }
  void prefetch(int64_t e, int64_t count) const {
    prefetch_values(dy + e, count);
    if constexpr (Mask) prefetch_values(y + e, count);
  }
  bool certified(T* dst, int64_t e, int64_t c) const {
#if BNKERNEL_CERTIFIED16
    return scale_certified<Mask>(dst, dy + e, Mask ? y + e : nullptr, loadf(f32 + c),
                                 loadf(f32 + channels + c));
#else
    (void)dst, (void)e, (void)c;
    return false;
#endif
  }
};

// the frozen dx of one channel's contiguous run, dx = g * k, as affine_run
template <typename T>
inline void scale_run(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx,
                      int64_t len, double k, bool stream, NextRuns<T> next = {}) {
  with_flag(y != nullptr, [&](auto mask) {
    constexpr bool kMask = decltype(mask)::value;
    auto value = [&](int64_t i) { return (kMask ? masked_dy(dy[i], y[i]) : widen(dy[i])) * k; };
    if constexpr (!is_half_v<T>) {
      write_run(dx, len, stream, value, next);
    } else {
      const vd vk = splat(k);
      auto vec = [&](int64_t i) {
        vd g = loadv(dy + i);
        if constexpr (kMask) g = masked_vec(g, loadv(y + i));
        return g * vk;
      };
#if BNKERNEL_CERTIFIED16
      float f[kScaleFloats] = {};
      const bool certify = certify_16bit_outputs() && scale_floats(k, f);
      const vf fk = splatf(f[0]), fbound = splatf(f[1]);
      auto cert = [&](T* p, int64_t i) {
        return certify && scale_certified<kMask>(p, dy + i, kMask ? y + i : nullptr, fk, fbound);
      };
#else
      auto cert = [&](T*, int64_t) { return false; };
#endif
      vector_run(dx, len, stream, vec, value, cert, next);
    }
  });
}

// the frozen dx over the whole array (as affine: 16-bit planar data a run at a time)
template <typename T>
void scale(const T* dy, const T* y, Shape s, const double* k_scale, T* dx, int threads) {
  Workspace ws;
  const float* f32 = nullptr;
  if constexpr (is_half_v<T>) {
    if (s.inner > 1) {
      planar_runs(s, dx, threads, [&](int64_t c, int64_t offset, bool stream) {
        scale_run(dy + offset, y ? y + offset : nullptr, dx + offset, s.inner, k_scale[c], stream,
                  NextRuns<T>{});
      });
      return;
    }
    f32 = channel_floats<kScaleFloats>(
        ws, s.channels, [&](int64_t c, float* f) { return scale_floats(k_scale[c], f); });
  }
  with_flag(y != nullptr, [&](auto mask) {
    elementwise_op(s, dx, threads,
                   ScaleOp<T, decltype(mask)::value>{dy, y, k_scale, f32, s.channels});
  });
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
