// The instruction set a translation unit is compiled for.
//
// kernels/stats.cpp, kernels/forward.cpp and kernels/backward.cpp are compiled once per instruction
// set (CMake passes -DBNKERNEL_ISA_NS=avx512 / avx2 / baseline with the matching -m flags), each
// copy in its own namespace bnkernel::<isa>.  Everything they include that is inline or a template
// must live in that namespace too: a helper compiled for AVX-512 must never be what the baseline
// copy calls. dispatch.cpp picks one copy at run time.
#pragma once

#ifndef BNKERNEL_ISA_NS
#define BNKERNEL_ISA_NS baseline
#endif
