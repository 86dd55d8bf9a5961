// Chan's merge of two partial statistics (count, mean, M2).
#pragma once

#include "bnkernel/dispatch/isa.hpp"

namespace bnkernel::BNKERNEL_ISA_NS::detail {

// (n, mean, m2) <- (n, mean, m2) (+) (nb, meanb, m2b)
inline void chan_merge(double& n, double& mean, double& m2, double nb, double meanb, double m2b) {
  if (nb == 0.0) return;
  if (n == 0.0) {
    n = nb;
    mean = meanb;
    m2 = m2b;
    return;
  }
  const double total = n + nb;
  const double delta = meanb - mean;
  mean += delta * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

}  // namespace bnkernel::BNKERNEL_ISA_NS::detail
