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
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "bnkernel/isa.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
using vd = double __attribute__((vector_size(kVecBytes)));
using vf = float __attribute__((vector_size(kVecBytes / 2)));
constexpr int64_t kVecLen = kVecBytes / 8;   // doubles per vector
constexpr int kVecs = 4;                     // vectors per accumulator
constexpr int64_t kLanes = kVecs * kVecLen;  // partial sums per accumulator

inline vd loadv(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vd loadv(const float* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vd>(_mm512_cvtps_pd(_mm256_loadu_ps(p)));  // one widening load
#elif defined(__AVX__)
  return reinterpret_cast<vd>(_mm256_cvtps_pd(_mm_loadu_ps(p)));
#else
  vf v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, vd);
#endif
}
// a * b + c, rounded once where the instruction set has a fused multiply-add (the AVX2 and AVX-512
// copies), else twice; fmas is the same for one value, so a value's arithmetic is the same
// whether it is computed in a vector or alone.
inline vd fmav(vd a, vd b, vd c) {
#if defined(__AVX512F__)
  return reinterpret_cast<vd>(_mm512_fmadd_pd(
      reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b), reinterpret_cast<__m512d>(c)));
#elif defined(__FMA__)
  return reinterpret_cast<vd>(_mm256_fmadd_pd(
      reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b), reinterpret_cast<__m256d>(c)));
#else
  return a * b + c;  // two roundings, as the scalar path without FMA
#endif
}
inline double fmas(double a, double b, double c) {
#if defined(__FMA__)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

inline vd splat(double x) {
  vd v;
  for (int64_t i = 0; i < kVecLen; ++i) v[i] = x;
  return v;
}

// kVecLen values of T from a vector of doubles, each rounded once
inline void storev(double* p, vd v) {
  std::memcpy(p, &v, sizeof v);
}
inline void storev(float* p, vd v) {
#if defined(__AVX512F__)
  _mm256_storeu_ps(p, _mm512_cvtpd_ps(reinterpret_cast<__m512d>(v)));
#elif defined(__AVX__)
  _mm_storeu_ps(p, _mm256_cvtpd_ps(reinterpret_cast<__m256d>(v)));
#else
  const vf f = __builtin_convertvector(v, vf);
  std::memcpy(p, &f, sizeof f);
#endif
}

// The gradient reaching batch normalization under a ReLU: dy where the output y > 0, else 0 (a
// NaN output passes no gradient, as torch's threshold_backward).
// y > 0 decided on the bits (an integer test, which vectorizes where a floating-point comparison
// does not; see relu_value): 0 < bits <= +inf's, i.e. positive, nonzero and not a NaN.
inline bool positive(float y) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof u);
  return u - 1u < 0x7f800000u;
}
inline bool positive(double y) {
  uint64_t u;
  std::memcpy(&u, &y, sizeof u);
  return u - 1u < 0x7ff0000000000000u;
}
// the bits of dy masked (a select of doubles does not vectorize in the `omp simd` loops)
template <typename T>
inline double masked_dy(T dy, T y) {
  double g = static_cast<double>(dy);
  uint64_t u;
  std::memcpy(&u, &g, sizeof u);
  u &= uint64_t{0} - static_cast<uint64_t>(positive(y));
  std::memcpy(&g, &u, sizeof u);
  return g;
}
inline vd masked_vec(vd dy, vd y) {
  const vd zero = splat(0.0);
  return y > zero ? dy : zero;
}

// kLanes partial sums, lane q in v[q / kVecLen][q % kVecLen].
struct Lanes {
  vd v[kVecs] = {};

  // the lanes folded in halves: l[i] += l[i + w] for w = kLanes / 2, ..., 1
  double total() const {
    double l[kLanes];
    std::memcpy(l, v, sizeof l);
    for (int64_t w = kLanes / 2; w >= 1; w /= 2) {
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

// The tail of a run (len < kLanes values) as kLanes doubles, the missing ones set to `pad`, a value
// chosen by the caller to add nothing to its sums.
template <typename T>
inline void pad_tail(const T* p, int64_t len, double pad, double* out) {
  for (int64_t q = 0; q < kLanes; ++q) out[q] = q < len ? static_cast<double>(p[q]) : pad;
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
