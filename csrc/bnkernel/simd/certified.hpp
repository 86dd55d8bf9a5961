// 16-bit outputs from float32 arithmetic, certified: the same bits as the double path, faster.
//
// A 16-bit output is the double result rounded once to the nearest 16-bit value.  Computing it in
// float32 instead gives a value y with an error we can bound, |y - exact| <= err (the bounds are
// derived beside each op in core/elementwise.hpp).  Round-to-nearest is monotone, so when y - err
// and y + err round to the same 16-bit value, every value between them does too: the exact result
// and the double path's result (within ~2^-52 of it, far inside err) both round to it, and that is
// the output, bit for bit.  When they differ (y lies within err of a point halfway between two
// 16-bit values), the vector is recomputed by the double path: for float16 outputs of normally
// distributed data, err is about 2^-21 of |y| against half-ulps of 2^-12 to 2^-11, so about one
// value in 600 and one vector of eight in 80 (bfloat16: 2^-8 half-ulps, 30 times rarer).  So the
// float path changes no result, only the time: a float16 vector costs one conversion in and two
// out instead of a widening to double, double arithmetic and a narrowing rounded to odd.  One
// thread, 32x64x56x56 and 4096x256, medians of interleaved runs: float16 inference 0.6-0.7x the
// time of the double path, training forward and backward 0.75-0.9x; bfloat16 0.45-0.95x.
//
// Conditions the bounds rely on, checked where the float coefficients are made
// (float_coefficient): each double coefficient is zero or has a magnitude in [2^-100, 2^100], so
// its float is normal and within a relative 2^-24 of it.  Underflow in the float arithmetic
// (gradual, or flushed to zero under FTZ/DAZ) costs at most 2^-126 absolute an operation, which
// the bounds' absolute terms cover.  A NaN or an infinity anywhere makes err NaN or infinite,
// which fails the test: such vectors go the double path, which defines their results.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "bnkernel/half.hpp"
#include "bnkernel/simd/vectors.hpp"

// The AVX2 and AVX-512 copies (FMA and F16C); the baseline copy keeps the double path alone.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define BNKERNEL_CERTIFIED16 1
#else
#define BNKERNEL_CERTIFIED16 0
#endif

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// The relative error bound of one float rounding (unit roundoff) and the multiple of it the
// bounds use: every bound below is at least twice what the derivation needs.
constexpr double kFloatRoundoff = 0x1p-24;
constexpr double kCertifyFactor = 0x1p-22;  // 4 roundoffs
// Absolute error an operation may add when its result underflows (2^-126 flushed to zero; far
// less when gradual), with room for a few dozen of them.
constexpr double kUnderflowFloor = 0x1p-120;

// d as a float the bounds can rely on (see above): false where it is not zero and its magnitude
// is outside [2^-100, 2^100] (or it is not finite).
inline bool float_coefficient(double d, float& f) {
  f = static_cast<float>(d);
  const double a = std::fabs(d);
  return d == 0.0 || (a >= 0x1p-100 && a <= 0x1p100);
}

// A non-negative bound, made in double, as a float no smaller than it (rounded up one step).
inline float bound_up(double b) {
  return std::nextafter(static_cast<float>(b), FLT_MAX);
}

// Whether the float path still pays, per run or chunk of rows: a vector that fails costs the
// float attempt, a mispredicted branch and the double path (about 60 cycles on Zen 4, against 6
// for the double path alone), so past one failure in 32 vectors the double path alone is faster.
// Failures depend on the data: on N(0, 1) inputs normalized with beta ~ N(0, 1), 3-7% of float16
// vectors fail (the bound's absolute term, from the coefficients' float roundings, is large next
// to the ulp of outputs near zero), and the float path then ran 25% slower than the double one
// (32x64x56x56 inference, one thread: 2.43 against 1.96 ms; 1.70 ms at 3%, 1.23 ms at none).
// Failures are counted against the attempts; once they pass one in 32 (after 32 attempts;
// bfloat16: one in 8, below), `on` turns off for the rest of the run or of the thread's chunks.
// (Either path gives the same bits, so the choice changes no output.)  A tighter affine bound was
// tried, with the coefficients' float roundings folded into a per-channel correction added to
// y (the bound then 8u|y| + 4u|d s| instead of 8u (|y| + |m s| + |b|)): it cut the failing
// float16 vectors on the bench's data from about 6% to 3% (simulated) but cost two more
// operations a vector, and measured no faster there and 15% slower on data that never fails.
template <typename T>
struct alignas(64) CertifyRate {  // (a cache line each: per-thread arrays share none)
  // bfloat16's double path costs twice float16's (it rounds on the integer bits), so its float
  // path pays up to more failures: one in 8 (32x64x56x56 inference on the bench's data, one
  // thread: 2.2 ms always certifying, 2.5 ms stopping at one in 32, 4.1 ms double alone)
  static constexpr int64_t kOneIn = std::is_same_v<T, bfloat16> ? 8 : 32;
  bool on = true;
  int64_t failed = 0;
  int64_t attempts = 0;  // (kept by callers that do not count attempts otherwise)
  // a failure at the `attempt`-th attempt (counting from 1)
  void fail(int64_t attempt) {
    ++failed;
    if (attempt >= 32 && failed * kOneIn > attempt) on = false;
  }
};

#if BNKERNEL_CERTIFIED16

#if defined(__AVX512F__)
using mf = __m256;   // kVecLen floats
using mh = __m128i;  // kVecLen 16-bit values
#else
using mf = __m128;
using mh = __m128i;  // the low 64 bits
#endif

inline vf as_vf(mf v) {
  return reinterpret_cast<vf>(v);
}
inline mf as_mf(vf v) {
  return reinterpret_cast<mf>(v);
}

inline vf splatf(float x) {
  vf v;
  for (int64_t i = 0; i < kVecLen; ++i) v[i] = x;
  return v;
}
inline vf absf(vf v) {
  return reinterpret_cast<vf>(reinterpret_cast<vu>(v) & 0x7fffffffu);
}
// a * b + c rounded once
inline vf fmaf_v(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return as_vf(_mm256_fmadd_ps(as_mf(a), as_mf(b), as_mf(c)));
#else
  return as_vf(_mm_fmadd_ps(as_mf(a), as_mf(b), as_mf(c)));
#endif
}
// max(v, 0), -0 to +0 (NaN lanes give 0 here, but a NaN never passes the test: see above)
inline vf relu_f(vf v) {
#if defined(__AVX512F__)
  return as_vf(_mm256_max_ps(as_mf(v), _mm256_setzero_ps()));
#else
  return as_vf(_mm_max_ps(as_mf(v), _mm_setzero_ps()));
#endif
}
// dy where y > 0 (ordered: a NaN y passes nothing), else +0: masked_vec's rule
inline vf masked_f(vf dy, vf y) {
  const vf zero = splatf(0.0f);
  return y > zero ? dy : zero;
}

// kVecLen values as floats (exact)
inline vf loadf(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf loadf(const float16* p) {
#if defined(__AVX512F__)
  return as_vf(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return as_vf(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
}
inline vf loadf(const bfloat16* p) {
#if defined(__AVX512F__)
  return as_vf(_mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
#else
  return as_vf(_mm_castsi128_ps(_mm_slli_epi32(
      _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16)));
#endif
}

// The 16-bit values nearest lo, ties to even, into bits; true when hi's are the same, lane by
// lane, and every lane of `finite` is set (AVX-512: a mask register; AVX2: a comparison's lanes).
#if defined(__AVX512F__)
using Lanes16 = __mmask8;
inline Lanes16 finite_lanes(vf err) {
  return _mm256_cmp_ps_mask(as_mf(err), _mm256_set1_ps(FLT_MAX), _CMP_LE_OQ);
}
inline bool nearest_equal(vf lo, vf hi, Lanes16 finite, float16, mh& bits) {
  bits = _mm256_cvtps_ph(as_mf(lo), _MM_FROUND_TO_NEAREST_INT);
  const mh other = _mm256_cvtps_ph(as_mf(hi), _MM_FROUND_TO_NEAREST_INT);
  return _mm_mask_cmpeq_epi16_mask(finite, bits, other) == 0xff;
}
inline bool nearest_equal(vf lo, vf hi, Lanes16 finite, bfloat16, mh& bits) {
  // to nearest even on the bits (a NaN never gets here: its lanes are not finite)
  const vu a = reinterpret_cast<vu>(lo), b = reinterpret_cast<vu>(hi);
  const vu ra = (a + 0x7fffu + ((a >> 16) & 1u)) >> 16;
  const vu rb = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  bits = _mm256_cvtepi32_epi16(reinterpret_cast<__m256i>(ra));
  return _mm256_mask_cmpeq_epi32_mask(finite, reinterpret_cast<__m256i>(ra),
                                      reinterpret_cast<__m256i>(rb)) == 0xff;
}
#else
using Lanes16 = vi;
inline Lanes16 finite_lanes(vf err) {
  return err <= splatf(FLT_MAX);
}
// every lane of a comparison's result true
inline bool all_lanes(vi mask) {
  return _mm_movemask_ps(_mm_castsi128_ps(reinterpret_cast<__m128i>(mask))) == 0xf;
}
inline bool nearest_equal(vf lo, vf hi, Lanes16 finite, float16, mh& bits) {
  bits = _mm_cvtps_ph(as_mf(lo), _MM_FROUND_TO_NEAREST_INT);
  const mh other = _mm_cvtps_ph(as_mf(hi), _MM_FROUND_TO_NEAREST_INT);
  // the four 16-bit comparisons widened to 32 bits, to be and-ed with `finite`
  const __m128i equal = _mm_cvtepi16_epi32(_mm_cmpeq_epi16(bits, other));
  return all_lanes(reinterpret_cast<vi>(equal) & finite);
}
inline bool nearest_equal(vf lo, vf hi, Lanes16 finite, bfloat16, mh& bits) {
  const vu a = reinterpret_cast<vu>(lo), b = reinterpret_cast<vu>(hi);
  const vu ra = (a + 0x7fffu + ((a >> 16) & 1u)) >> 16;
  const vu rb = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const auto q = reinterpret_cast<__m128i>(ra);
  bits = _mm_packus_epi32(q, q);  // each lane < 2^16
  return all_lanes(reinterpret_cast<vi>(ra == rb) & finite);
}
#endif

// Stores the kVecLen 16-bit values nearest y and returns true when y's error bound err certifies
// them (see the top of this file); stores nothing and returns false otherwise.  With Relu the
// output is max(., 0) of the value, which commutes with rounding (both are monotone, and a value
// rounding to -0 gives +0 either way), so the ends are taken through it.  A NaN or infinite bound
// (a NaN y makes err NaN) fails: err <= FLT_MAX is false.
template <bool Relu = false, typename T>
inline bool store_certified(T* p, vf y, vf err) {
  vf lo = y - err, hi = y + err;
  if constexpr (Relu) {
    lo = relu_f(lo);
    hi = relu_f(hi);
  }
  mh bits;
  if (!nearest_equal(lo, hi, finite_lanes(err), T{}, bits)) return false;
#if defined(__AVX512F__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bits);
#else
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), bits);
#endif
  return true;
}

#endif  // BNKERNEL_CERTIFIED16

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
