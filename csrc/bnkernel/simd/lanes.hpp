// Sums over contiguous runs with independent lanes, in an order fixed by this source.
//
// A single running sum is bound by the latency of one add per element; the kernels instead keep
// kLanes partial sums, value q of a run going to lane q % kLanes, and fold the lanes in a fixed
// pairwise order at the end.  The lanes are four of the widest vectors the translation unit is
// compiled for (GCC/Clang vector types: 4 x 8 doubles with AVX-512, 4 x 4 with AVX2, 4 x 2
// otherwise): four independent add chains per accumulator hide the add latency.  They are
// written out rather than left to a `reduction` clause, so the order of the additions is fixed
// by the source and the instruction set, never by the thread count or the compiler's mood.
#pragma once

#include <cstdint>
#include <cstring>

#include "bnkernel/simd/convert.hpp"
#include "bnkernel/simd/vectors.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

constexpr int kVecs = 4;                     // vectors per accumulator
constexpr int64_t kLanes = kVecs * kVecLen;  // partial sums per accumulator

// kLanes partial sums, lane q in v[q / kVecLen][q % kVecLen].  A loop adds into a local copy
// (`Lanes a = sums; ...loop...; sums = a;` around each contiguous run): GCC 12 kept a Lanes that
// the run's lambda reached by reference in memory, with a store of every vector per block; the
// local copy lives in registers (the planar statistics in L1, float32: 0.157 -> 0.114 ns a value).
struct Lanes {
  vd v[kVecs] = {};

  // the lanes folded in halves: l[i] += l[i + w] for w = kLanes / 2, ..., 1.  The halves of w >=
  // kVecLen are whole vectors (lane i is in v[i / kVecLen]), added as vectors; then the last
  // vector's lanes in halves: the same additions in the same order as lane by lane.
  double total() const {
    vd f[kVecs];
    for (int k = 0; k < kVecs; ++k) f[k] = v[k];
    for (int n = kVecs / 2; n >= 1; n /= 2) {
      for (int k = 0; k < n; ++k) f[k] += f[k + n];
    }
    double l[kVecLen];
    std::memcpy(l, &f[0], sizeof l);
    for (int64_t w = kVecLen / 2; w >= 1; w /= 2) {
      for (int64_t i = 0; i < w; ++i) l[i] += l[i + w];
    }
    return l[0];
  }
};

// f(k, offset) for each of the kVecs vectors of a block of kLanes values.
template <class F>
inline void for_each_vec(F&& f) {
#pragma GCC unroll 8
  for (int k = 0; k < kVecs; ++k) f(k, static_cast<int64_t>(k) * kVecLen);
}

// one(v, values) for the vectors of the tail of a run (len < kLanes values at p) that hold any of
// its values: the whole ones straight from p, the last partial one through buf (kVecLen doubles)
// with its missing values set to `pad`, chosen by the caller to add nothing to its sums.  The
// vectors past the tail are not taken at all: they would add zeros, which change no lane (a lane
// starts at +0 and, rounding to nearest, never becomes -0), so the sums are the same bits.
template <typename T, class F>
inline void tail_vectors(const T* p, int64_t len, double pad, double* buf, F&& one) {
  for (int v = 0; v < kVecs; ++v) {
    const int64_t o = static_cast<int64_t>(v) * kVecLen;
    if (o + kVecLen <= len) {
      one(v, p + o);
    } else if (o < len) {
      int64_t q = 0;
      for (; q < len - o; ++q) buf[q] = widen(p[o + q]);
      for (; q < kVecLen; ++q) buf[q] = pad;
      one(v, static_cast<const double*>(buf));
    }
  }
}

// The tail of a run (len < kLanes values) as kLanes doubles, the missing ones set to `pad`, a value
// chosen by the caller to add nothing to its sums.
template <typename T>
inline void pad_tail(const T* p, int64_t len, double pad, double* out) {
  // (two loops, which vectorize, rather than one with a test per value)
  int64_t q = 0;
  for (; q < len; ++q) out[q] = widen(p[q]);
  for (; q < kLanes; ++q) out[q] = pad;
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
