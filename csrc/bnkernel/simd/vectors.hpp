// The widest vector types of the translation unit's instruction set (GCC/Clang vector types), and
// their float and double loads, stores, splat and multiply-add.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "bnkernel/dispatch/isa.hpp"

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
using vu = uint32_t __attribute__((vector_size(kVecBytes / 2)));  // lanes of vf as bits
using vq = int64_t __attribute__((vector_size(kVecBytes)));       // lanes of vd as bits
using vi = int32_t __attribute__((vector_size(kVecBytes / 2)));
using vh = uint16_t __attribute__((vector_size(kVecBytes / 4)));  // 16-bit values, one per lane
constexpr int64_t kVecLen = kVecBytes / 8;                        // doubles per vector

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

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
