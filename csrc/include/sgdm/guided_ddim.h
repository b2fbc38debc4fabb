// The guided DDIM update, written once for the CPU and CUDA kernels.
//
// Guidance (self-guided diffusion, Hu et al. 2023, Eq. 4):
//   eps = (1 - w) * eps_uncond + w * eps_cond = eps_uncond + w * (eps_cond - eps_uncond)
// DDIM (Song et al. 2021, Eq. 12), a_t = alpha_bar_t, a_p = alpha_bar_prev:
//   x0      = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
//   sigma_t = eta * sqrt((1 - a_p) / (1 - a_t)) * sqrt(1 - a_t / a_p)
//   x_prev  = sqrt(a_p) * x0 + sqrt(1 - a_p - sigma_t^2) * eps + sigma_t * noise
// With clipping, x0 is clamped to [-c, c] and eps is re-derived from the
// clamped x0 so the direction term stays consistent with it.
#pragma once

#include <cmath>

#include "sgdm/macros.h"

namespace sgdm {

// Per-sample coefficients, computed in double and stored as Acc
// (float for fp32/fp16/bf16 data, double for fp64).
template <typename Acc>
struct DdimCoeffs {
  Acc inv_sqrt_at;     // 1 / sqrt(a_t)
  Acc sqrt_1m_at;      // sqrt(1 - a_t)
  Acc sqrt_at;         // sqrt(a_t)
  Acc inv_sqrt_1m_at;  // 1 / sqrt(1 - a_t), 0 when a_t == 1
  Acc sqrt_ap;         // sqrt(a_p)
  Acc dir;             // sqrt(max(1 - a_p - sigma^2, 0))
  Acc sigma;           // sigma_t
};

// a_t == 1 (no noise left) makes sigma 0/0; its limit is 0 (nothing to add).
template <typename Acc>
SGDM_INLINE DdimCoeffs<Acc> ddim_coeffs(double a_t, double a_p, double eta) {
  DdimCoeffs<Acc> c;
  const double one_m_at = 1.0 - a_t;
  double sigma = 0.0;
  if (eta != 0.0 && one_m_at > 0.0) {
    const double ratio = 1.0 - a_t / a_p;
    sigma = eta * sqrt((1.0 - a_p) / one_m_at) * sqrt(ratio > 0.0 ? ratio : 0.0);
  }
  const double dir2 = 1.0 - a_p - sigma * sigma;
  c.inv_sqrt_at = static_cast<Acc>(1.0 / sqrt(a_t));
  c.sqrt_1m_at = static_cast<Acc>(sqrt(one_m_at));
  c.sqrt_at = static_cast<Acc>(sqrt(a_t));
  c.inv_sqrt_1m_at = one_m_at > 0.0 ? static_cast<Acc>(1.0 / sqrt(one_m_at)) : Acc(0);
  c.sqrt_ap = static_cast<Acc>(sqrt(a_p));
  c.dir = static_cast<Acc>(dir2 > 0.0 ? sqrt(dir2) : 0.0);
  c.sigma = static_cast<Acc>(sigma);
  return c;
}

// Eq. 4 guidance. T is float / double on CUDA and at::vec::Vectorized<> on CPU.
template <typename T>
SGDM_INLINE T guided_eps(T eps_cond, T eps_uncond, T w) {
  return eps_uncond + w * (eps_cond - eps_uncond);
}

// x0 prediction without clipping.
template <typename T>
SGDM_INLINE T ddim_x0(T x, T eps, T sqrt_1m_at, T inv_sqrt_at) {
  return (x - sqrt_1m_at * eps) * inv_sqrt_at;
}

// eps consistent with a (clamped) x0: eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t).
template <typename T>
SGDM_INLINE T ddim_eps_from_x0(T x, T x0, T sqrt_at, T inv_sqrt_1m_at) {
  return (x - sqrt_at * x0) * inv_sqrt_1m_at;
}

// x_prev without the noise term (added by the caller when sigma != 0).
template <typename T>
SGDM_INLINE T ddim_x_prev(T x0, T eps, T sqrt_ap, T dir) {
  return sqrt_ap * x0 + dir * eps;
}

}  // namespace sgdm
