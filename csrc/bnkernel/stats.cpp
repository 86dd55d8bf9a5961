// channel_stats and merge_stats.
#include <algorithm>
#include <cstdint>

#include "bnkernel/isa_kernels.hpp"
#include "bnkernel/reductions.hpp"

namespace bnkernel::BNKERNEL_ISA_NS {

template <typename T>
void channel_stats(const T* x, Shape s, double* mean, double* m2) {
  detail::channel_moments(x, s, threads_for(s.size()), mean, m2);
}

template void channel_stats<float>(const float*, Shape, double*, double*);
template void channel_stats<double>(const double*, Shape, double*, double*);
template void channel_stats<float16>(const float16*, Shape, double*, double*);
template void channel_stats<bfloat16>(const bfloat16*, Shape, double*, double*);

}  // namespace bnkernel::BNKERNEL_ISA_NS
