// Shared by the CPU (csrc/attention.cpp) and CUDA (csrc/cuda/attention_launch.cpp)
// glue of sgdm::attention: argument checks that name the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace sgdm {

// q [B, H, Nq, D], k and v [B, H, Nk, D], same dtype, non-empty.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// grad_out and out like q, lse [B, H, Nq], grad_lse absent or like lse.
void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                                     const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse);

}  // namespace sgdm
