// How many threads a kernel runs on, and which one the caller is (threads.cpp; the public controls,
// set_num_threads and get_num_threads, are in kernels.hpp).
#pragma once

#include <cstdint>

namespace bnkernel {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

// Number of threads for `elements` elements of work: 1 below the parallel threshold.
int threads_for(int64_t elements);

// The calling thread's index in the innermost enclosing parallel region (0 outside one).
int thread_index();

}  // namespace bnkernel
