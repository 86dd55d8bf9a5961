// The kernel declarations inside this translation unit's instruction-set namespace.
#pragma once

#include "bnkernel/isa.hpp"
#include "bnkernel/kernels.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {
#include "bnkernel/kernel_api.inc"
}  // namespace bnkernel::BNKERNEL_ISA_NS
