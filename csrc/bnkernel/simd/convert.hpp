// Conversions between the storage types and double: widen, narrow (rounded once, to nearest even),
// and the vector loads and stores of the 16-bit types.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "bnkernel/half.hpp"
#include "bnkernel/simd/vectors.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

//
// widen(v): a value of T as a double (exact for every T).  narrow<T>(d): d rounded once to the
// nearest T, ties to even.  For the 16-bit types d is first rounded to float32 "to odd" (toward
// zero, then the last bit set if that lost anything) and that float rounded to nearest: since a
// float keeps 13 or 16 more bits than the target, the odd bit still tells a tie from a value just
// above or below it, and the two steps give exactly the double's correctly rounded value (Boldo
// and Melquiond's rounding to odd), where double -> float -> half would round twice.  Everything
// is done on the bits with integer selects, which vectorize in the `omp simd` loops.

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint64_t double_bits(double d) {
  uint64_t u;
  std::memcpy(&u, &d, sizeof u);
  return u;
}
constexpr uint64_t kAbs64 = 0x7fffffffffffffffu;

// The conversions are forced inline: GCC's heuristics otherwise leave narrow<float16> a call in
// some of the elementwise loops, and a call is a loop that does not vectorize (10x slower).
#define BNKERNEL_CONVERSION inline __attribute__((always_inline))

BNKERNEL_CONVERSION double widen(float v) {
  return static_cast<double>(v);
}
BNKERNEL_CONVERSION double widen(double v) {
  return v;
}
BNKERNEL_CONVERSION double widen(bfloat16 v) {
  return static_cast<double>(bits_float(static_cast<uint32_t>(v.bits) << 16));
}
BNKERNEL_CONVERSION double widen(float16 v) {
  const uint32_t h = v.bits;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  const uint32_t sign = (h & 0x8000u) << 16;
  // (selects written as masks: GCC does not vectorize the ternaries here)
  const uint32_t special = 0u - static_cast<uint32_t>(em >= 0x7c00u);
  const uint32_t small = 0u - static_cast<uint32_t>(em < 0x400u);
  // normal numbers: the exponent rebiased from 15 to 127; inf and NaN: all ones (31 -> 255)
  const uint32_t normal = (em << 13) + (112u << 23) + (special & (112u << 23));
  // subnormal numbers and zero: em * 2^-24, exact in float (and no float subnormal involved)
  const uint32_t sub = float_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  return static_cast<double>(bits_float((sub & small) | (normal & ~small) | sign));
}

// d as float32 bits rounded to odd (see above); NaN stays NaN, overflow gives FLT_MAX (odd).
BNKERNEL_CONVERSION uint32_t round_to_odd_bits(double d) {
  const auto f = static_cast<float>(d);  // to nearest
  const uint64_t back = double_bits(static_cast<double>(f)) & kAbs64;
  const uint64_t orig = double_bits(d) & kAbs64;
  uint32_t u = float_bits(f);
  u -= static_cast<uint32_t>(back > orig);   // rounded away from zero: one step back
  u |= static_cast<uint32_t>(back != orig);  // inexact: the sticky bit
  return u;
}

// float32 bits to binary16 bits, to nearest even
BNKERNEL_CONVERSION uint16_t half_from_float_bits(uint32_t u) {
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal range (2^-14 <= |x| < 2^16): rebias, round at bit 13; a carry may reach inf, as it must
  const uint32_t normal = (a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  // below 2^-14: x + 0.5 rounds x to a multiple of 2^-24 (float's spacing on [0.5, 1)), which is
  // binary16's subnormal spacing; the count of those is the result's bits
  const uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3f000000u;
  const uint32_t special = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN, or inf (and overflow)
  const uint32_t h = a >= 0x47800000u ? special : (a < 0x38800000u ? sub : normal);
  return static_cast<uint16_t>(sign | h);
}

// float32 bits to bfloat16 bits, to nearest even (NaN kept a quiet NaN)
BNKERNEL_CONVERSION uint16_t bfloat16_from_float_bits(uint32_t u) {
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

template <typename T>
BNKERNEL_CONVERSION T narrow(double d) {
  if constexpr (std::is_same_v<T, float16>) {
    return float16{half_from_float_bits(round_to_odd_bits(d))};
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return bfloat16{bfloat16_from_float_bits(round_to_odd_bits(d))};
  } else {
    return static_cast<T>(d);
  }
}

// round_to_odd_bits on a vector
inline vu round_to_odd_vec(vd d) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  // truncate, then set the last bit where that was inexact (NaN included)
  const __m512d v = reinterpret_cast<__m512d>(d);
  // (the zero-masked forms with every lane selected are the same instructions; the plain
  // intrinsics' "undefined" operand trips GCC 12's -Wuninitialized where this is not inlined)
  const __m256 t = _mm512_maskz_cvt_roundpd_ps(0xFF, v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask8 inexact = _mm512_cmp_pd_mask(_mm512_maskz_cvtps_pd(0xFF, t), v, _CMP_NEQ_UQ);
  const __m256i bits = _mm256_castps_si256(t);
  return reinterpret_cast<vu>(_mm256_mask_or_epi32(bits, inexact, bits, _mm256_set1_epi32(1)));
#elif defined(__AVX2__)
  // to nearest, then one step back where that went away from zero; the 64-bit comparison masks
  // are all ones or all zeros, so their even 32-bit halves are the 32-bit masks
  const __m256d v = reinterpret_cast<__m256d>(d);
  const __m128 f = _mm256_cvtpd_ps(v);
  const __m256d back = _mm256_cvtps_pd(f);
  const __m256d abs = _mm256_castsi256_pd(_mm256_set1_epi64x(static_cast<int64_t>(kAbs64)));
  const __m256d away = _mm256_cmp_pd(_mm256_and_pd(back, abs), _mm256_and_pd(v, abs), _CMP_GT_OQ);
  const __m256d inexact = _mm256_cmp_pd(back, v, _CMP_NEQ_UQ);
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m128i away32 =
      _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(away), even));
  const __m128i inexact32 =
      _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(inexact), even));
  const __m128i u = _mm_add_epi32(_mm_castps_si128(f), away32);
  return reinterpret_cast<vu>(_mm_or_si128(u, _mm_and_si128(inexact32, _mm_set1_epi32(1))));
#else
  const vf f = __builtin_convertvector(d, vf);
  const vd back = __builtin_convertvector(f, vd);
  const vq b = reinterpret_cast<vq>(back) & static_cast<int64_t>(kAbs64);
  const vq o = reinterpret_cast<vq>(d) & static_cast<int64_t>(kAbs64);
  const vi away = __builtin_convertvector(b > o, vi);      // -1 where rounded away from zero
  const vi inexact = __builtin_convertvector(b != o, vi);  // -1 where inexact
  return (reinterpret_cast<vu>(f) + reinterpret_cast<vu>(away)) |
         (reinterpret_cast<vu>(inexact) & 1u);
#endif
}

inline vd loadv(const float16* p) {
#if defined(__AVX512F__) && defined(__F16C__)
  return reinterpret_cast<vd>(
      _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX__) && defined(__F16C__)
  return reinterpret_cast<vd>(
      _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  vd v;
  for (int64_t i = 0; i < kVecLen; ++i) v[i] = widen(p[i]);
  return v;
#endif
}
inline vd loadv(const bfloat16* p) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  const __m256i u = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vd>(_mm512_cvtps_pd(_mm256_castsi256_ps(u)));
#elif defined(__AVX2__)
  const __m128i u =
      _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vd>(_mm256_cvtps_pd(_mm_castsi128_ps(u)));
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu) << 16;
  return __builtin_convertvector(reinterpret_cast<vf>(u), vd);
#endif
}

inline void storev(float16* p, vd v) {
  const vu u = round_to_odd_vec(v);
#if defined(__AVX512F__) && defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(u), _MM_FROUND_TO_NEAREST_INT));
#elif defined(__AVX__) && defined(__F16C__)
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p),
                   _mm_cvtps_ph(reinterpret_cast<__m128>(u), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int64_t i = 0; i < kVecLen; ++i) p[i] = float16{half_from_float_bits(u[i])};
#endif
}
inline void storev(bfloat16* p, vd v) {
  const vu u = round_to_odd_vec(v);
#if defined(__AVX2__) && !defined(__AVX512F__)
  // as below; the NaN test as a signed comparison (AVX2 has no unsigned one), exact on 31 bits
  const auto q = reinterpret_cast<__m128i>(u);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(q, 16), _mm_set1_epi32(1));
  const __m128i rounded =
      _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(q, _mm_set1_epi32(0x7fff)), lsb), 16);
  const __m128i nan = _mm_or_si128(_mm_srli_epi32(q, 16), _mm_set1_epi32(0x40));
  const __m128i is_nan =
      _mm_cmpgt_epi32(_mm_and_si128(q, _mm_set1_epi32(0x7fffffff)), _mm_set1_epi32(0x7f800000));
  const __m128i r = _mm_blendv_epi8(rounded, nan, is_nan);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(r, r));
#else
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vu nan = (u >> 16) | 0x40u;
  const auto is_nan = reinterpret_cast<vu>((u & 0x7fffffffu) > 0x7f800000u);
  const vu r = (nan & is_nan) | (rounded & ~is_nan);  // each lane < 2^16
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtepi32_epi16(reinterpret_cast<__m256i>(r)));
#else
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(p, &h, sizeof h);
#endif
#endif
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
