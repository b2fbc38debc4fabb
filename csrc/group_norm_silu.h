// Argument checking, layout and output allocation of sgdm::group_norm_silu,
// shared by the CPU glue (group_norm_silu.cpp) and the CUDA launcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "sgdm/group_norm_args.h"

namespace sgdm {

struct GroupNormPrepared {
  GroupNormShape shape;
  at::Tensor x;             // contiguous or channels-last view of the input
  at::Tensor weight, bias;  // Acc-typed copies ([C] or [N, C]), or undefined
  int64_t weight_stride = 0, bias_stride = 0;  // per-sample strides: C for [N, C], else 0
};

// Checks x [N, C, *] against num_groups / weight / bias ([C] or [N, C] each)
// and picks the layout.
GroupNormPrepared prepare_group_norm(const at::Tensor& x, int64_t num_groups,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, bool silu);

// An uninitialised tensor shaped like x with the layout in `shape`.
at::Tensor empty_group_norm_like(const at::Tensor& x, const GroupNormShape& shape);

// `t` in the layout of `shape` (a no-op when it already is).
at::Tensor to_group_norm_layout(const at::Tensor& t, const GroupNormShape& shape);

// Forward: checked inputs, allocated outputs (y, mean, rstd) and kernel arguments.
struct GroupNormForward {
  GroupNormPrepared p;
  at::Tensor y, mean, rstd;
  GroupNormFwdArgs args;
};

GroupNormForward prepare_forward(const at::Tensor& x, int64_t num_groups,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps, bool silu);

// Backward: checked inputs, allocated grad_x and per-sample affine sums, kernel arguments.
struct GroupNormBackward {
  GroupNormPrepared p;
  at::Tensor dy, dx, mean, rstd, sum_dz, sum_dzx;
  GroupNormBwdArgs args;
  // (grad_x, grad_weight, grad_bias), the affine grads shaped like weight / bias ([C] when
  // absent); empty [0] when not requested.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() const;
};

GroupNormBackward prepare_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& mean, const at::Tensor& rstd,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, int64_t num_groups,
                                   bool silu, bool affine_grads);

// The float type of statistics and affine grads: float64 for fp64 data, else float32.
at::ScalarType group_norm_acc_type(const at::Tensor& x);

}  // namespace sgdm
