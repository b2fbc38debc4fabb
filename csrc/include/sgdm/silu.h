// SiLU and its derivative, written once for the CPU and CUDA kernels.
//
// Templated on T so the CPU kernels instantiate them with
// at::vec::Vectorized<float> (one SIMD register) and the CUDA kernels with
// float: the CPU tests then cover exactly the maths the GPU runs.
// The sigmoid is passed in because exp differs per target (at::vec exp on
// CPU, __expf on CUDA).
#pragma once

#include "sgdm/macros.h"

namespace sgdm {

// silu(z) = z * sigmoid(z)
template <typename T>
SGDM_INLINE T silu_from_sigmoid(T z, T sig) {
  return z * sig;
}

// d silu / dz = sigmoid(z) * (1 + z * (1 - sigmoid(z)))
template <typename T>
SGDM_INLINE T silu_grad_from_sigmoid(T z, T sig) {
  const T one(1);
  return sig * (one + z * (one - sig));
}

}  // namespace sgdm
