// ReLU decided on the bits: the forward's max(v, 0), and the backward's dy masked where y > 0.
#pragma once

#include <cstdint>
#include <cstring>

#include "bnkernel/half.hpp"
#include "bnkernel/simd/convert.hpp"
#include "bnkernel/simd/vectors.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// max(v, 0) that keeps a NaN (as torch.relu does), decided and applied on the bits: GCC vectorizes
// neither `v < 0 ? 0 : v` (a floating-point comparison might trap under the default
// -ftrapping-math, which the plain kernels run faster with) nor a select of doubles on an integer
// test inside the `omp simd` loops, but it does vectorize masking the bits.  Zero (+0) when the
// sign bit is set and the value is not a NaN (-inf and -0 included).
inline double relu_value(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint64_t negative = static_cast<uint64_t>((u >> 63) != 0) &
                            static_cast<uint64_t>((u << 1) <= 0xffe0000000000000u);
  u &= negative - 1;  // all ones to keep v, zero to clear it
  std::memcpy(&v, &u, sizeof u);
  return v;
}
inline vd relu_vec(vd v) {  // relu_value's results: -0 -> +0, NaN kept
  const vd zero = splat(0.0);
  return v <= zero ? zero : v;
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
inline bool positive(float16 y) {
  return static_cast<uint32_t>(y.bits) - 1u < 0x7c00u;
}
inline bool positive(bfloat16 y) {
  return static_cast<uint32_t>(y.bits) - 1u < 0x7f80u;
}
inline bool positive(double y) {
  uint64_t u;
  std::memcpy(&u, &y, sizeof u);
  return u - 1u < 0x7ff0000000000000u;
}
// the bits of dy masked (a select of doubles does not vectorize in the `omp simd` loops)
template <typename T>
inline double masked_dy(T dy, T y) {
  double g = widen(dy);
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

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
