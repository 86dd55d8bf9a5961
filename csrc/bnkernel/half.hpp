// The 16-bit floating-point storage types: IEEE binary16 (NumPy's float16) and bfloat16 (the top
// half of a float32, ml_dtypes.bfloat16).
//
// They are bits only, with no arithmetic and no conversion operators: the kernels read and write
// them through detail::widen / detail::narrow (simd/convert.hpp), which live in each instruction
// set's namespace (an inline conversion compiled for AVX-512 must never be what the baseline copy
// calls). Everything else about half-precision data is float32 or wider: parameters, running
// statistics and dgamma / dbeta are float32 (Param<T>), statistics and every intermediate value are
// double, and each output is rounded once, from double, to the nearest 16-bit value.
#pragma once

#include <cstdint>
#include <type_traits>

namespace bnkernel {

struct float16 {
  uint16_t bits;
};
struct bfloat16 {
  uint16_t bits;
};
static_assert(sizeof(float16) == 2 && std::is_trivially_copyable_v<float16>);
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);

template <typename T>
constexpr bool is_half_v = std::is_same_v<T, float16> || std::is_same_v<T, bfloat16>;

// The dtype of the per-channel parameters (gamma, beta), the running statistics and the parameter
// gradients for data of type T: T itself, or float32 for 16-bit data (as PyTorch's and Keras'
// mixed precision keep them).
template <typename T>
using Param = std::conditional_t<is_half_v<T>, float, T>;

}  // namespace bnkernel
