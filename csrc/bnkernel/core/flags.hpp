// Run-time flags made compile-time ones: f(std::bool_constant<flag>{}...), so that a kernel's inner
// loops are compiled once per combination and carry no test.
#pragma once

#include <type_traits>

#include "bnkernel/dispatch/isa.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// f(std::bool_constant<a>{}, std::bool_constant<b>{})
template <class F>
inline void with_flags(bool a, bool b, F&& f) {
  if (a) {
    if (b) {
      f(std::true_type{}, std::true_type{});
    } else {
      f(std::true_type{}, std::false_type{});
    }
  } else if (b) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

template <class F>
inline void with_flag(bool a, F&& f) {
  if (a) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
