// Argument checking and output allocation of sgdm::guided_ddim_step, shared
// by the CPU glue (guided_ddim_step.cpp) and the CUDA launcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "sgdm/guided_ddim_args.h"

namespace sgdm {

struct GuidedDdimPrepared {
  GuidedDdimArgs args;
  std::vector<at::Tensor> inputs;  // keeps contiguous copies alive
  at::Tensor alpha_t, alpha_prev;  // float64 [B] on the input device, or undefined
  at::Tensor x_prev, x0;
};

GuidedDdimPrepared prepare_guided_ddim(
    const at::Tensor& x_t, const at::Tensor& eps_cond, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& alpha_bar_t,
    const std::optional<at::Tensor>& alpha_bar_prev, double alpha_bar_t_scalar,
    double alpha_bar_prev_scalar, double guidance_scale, double eta, std::optional<double> clip_x0);

}  // namespace sgdm
