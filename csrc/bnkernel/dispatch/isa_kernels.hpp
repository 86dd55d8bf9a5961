// The kernels' declarations (kernel_list.hpp) in this translation unit's instruction-set namespace.
#pragma once

#include "bnkernel/dispatch/isa.hpp"
#include "bnkernel/kernels.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {
BNKERNEL_DECLARE(BNKERNEL_KERNELS)
}  // namespace bnkernel::BNKERNEL_ISA_NS
