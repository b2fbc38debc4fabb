// Torch-free arguments of the guided DDIM step kernels (CPU and CUDA).
#pragma once

#include <cstdint>

#include "sgdm/dtype.h"

namespace sgdm {

// Every tensor is viewed as [batch, per_sample] dense memory with one layout.
struct GuidedDdimArgs {
  int64_t batch = 0;
  int64_t per_sample = 0;
  DType dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* eps_cond = nullptr;
  const void* eps_uncond = nullptr;  // null: no guidance, eps = eps_cond
  const void* noise = nullptr;       // null: no noise term
  // Per-sample alpha_bar (float64 [batch], on the kernel's device); null
  // means the scalar is used for every sample.
  const double* alpha_t = nullptr;
  const double* alpha_prev = nullptr;
  double alpha_t_scalar = 1.0;
  double alpha_prev_scalar = 1.0;
  double guidance_scale = 1.0;
  double eta = 0.0;
  bool clip = false;
  double clip_value = 0.0;
  void* x_prev = nullptr;
  void* x0 = nullptr;
};

}  // namespace sgdm
