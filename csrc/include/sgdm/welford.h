// Welford / Chan parallel merge of (count, mean, M2) partial statistics.
//
// Chan et al. (1979): merging two partials with counts n_a, n_b:
//   delta = mean_b - mean_a,  n = n_a + n_b
//   mean  = mean_a + delta * n_b / n
//   M2    = M2_a + M2_b + delta^2 * n_a * n_b / n
// Numerically stable where sum/sum-of-squares cancels catastrophically.
#pragma once

#include "sgdm/macros.h"

namespace sgdm {

template <typename Acc>
struct WelfordData {
  Acc mean;
  Acc m2;
  Acc count;
};

template <typename Acc>
SGDM_INLINE WelfordData<Acc> welford_merge(WelfordData<Acc> a, WelfordData<Acc> b) {
  const Acc n = a.count + b.count;
  if (n == Acc(0)) {
    return a;
  }
  const Acc delta = b.mean - a.mean;
  const Acc nb_over_n = b.count / n;
  WelfordData<Acc> out;
  out.mean = a.mean + delta * nb_over_n;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * nb_over_n;
  out.count = n;
  return out;
}

// Population variance M2 / n (GroupNorm uses the biased estimator).
template <typename Acc>
SGDM_INLINE Acc welford_variance(WelfordData<Acc> w) {
  return w.count > Acc(0) ? w.m2 / w.count : Acc(0);
}

}  // namespace sgdm
