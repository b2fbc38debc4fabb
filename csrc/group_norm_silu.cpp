// sgdm::group_norm_silu and its backward: schemas and CPU implementation
// (glue only; kernels in csrc/cpu/group_norm_silu_kernel.cpp and
// csrc/cuda/group_norm_silu.cu). Autograd and fake kernels are registered in
// sgdm/ops/group_norm_silu.py.
#include "group_norm_silu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/group_norm_silu_kernel.h"
#include "op_utils.h"

namespace sgdm {

at::ScalarType group_norm_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

GroupNormPrepared prepare_group_norm(const at::Tensor& x, int64_t num_groups,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, bool silu) {
  TORCH_CHECK(x.dim() >= 2, "sgdm.group_norm_silu: x must be [N, C, *], got shape ", x.sizes());
  GroupNormPrepared p;
  GroupNormShape& s = p.shape;
  s.dtype = dtype_tag(x, "x");
  s.n = x.size(0);
  s.c = x.size(1);
  TORCH_CHECK(num_groups > 0 && s.c % num_groups == 0, "sgdm.group_norm_silu: num_groups (",
              num_groups, ") must be positive and divide the channel count C = ", s.c);
  s.groups = num_groups;
  s.hw = s.n * s.c > 0 ? x.numel() / (s.n * s.c) : 0;
  s.silu = silu;
  const at::Tensor nhwc = x.movedim(1, -1);
  s.channels_last = x.dim() > 2 && !x.is_contiguous() && nhwc.is_contiguous();
  p.x = s.channels_last ? x : x.contiguous();
  const at::ScalarType acc = group_norm_acc_type(x);
  auto affine = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == s.c, "sgdm.group_norm_silu: ", name,
                " must have shape [C] = [", s.c, "], got ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), "sgdm.group_norm_silu: ", name, " is on ",
                t->device(), " but x is on ", x.device());
    dtype_tag(*t, name);
    return t->to(acc).contiguous();
  };
  p.weight = affine(weight, "weight");
  p.bias = affine(bias, "bias");
  return p;
}

at::Tensor empty_group_norm_like(const at::Tensor& x, const GroupNormShape& shape) {
  if (!shape.channels_last) return at::empty(x.sizes(), x.options());
  return at::empty(x.movedim(1, -1).sizes(), x.options()).movedim(-1, 1);
}

at::Tensor to_group_norm_layout(const at::Tensor& t, const GroupNormShape& shape) {
  if (!shape.channels_last) return t.contiguous();
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

namespace {

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, int64_t num_groups,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           double eps, bool silu) {
  GroupNormPrepared p = prepare_group_norm(x, num_groups, weight, bias, silu);
  at::Tensor y = empty_group_norm_like(x, p.shape);
  const auto stat_opts = x.options().dtype(group_norm_acc_type(x));
  at::Tensor mean = at::empty({p.shape.n, num_groups}, stat_opts);
  at::Tensor rstd = at::empty({p.shape.n, num_groups}, stat_opts);
  GroupNormFwdArgs a;
  a.s = p.shape;
  a.eps = eps;
  a.x = p.x.const_data_ptr();
  a.weight = ptr_or_null(p.weight);
  a.bias = ptr_or_null(p.bias);
  a.y = y.mutable_data_ptr();
  a.mean = mean.mutable_data_ptr();
  a.rstd = rstd.mutable_data_ptr();
  SGDM_CPU_DISPATCH(group_norm_silu_fwd_kernel, a);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, bool silu, bool affine_grads) {
  GroupNormPrepared p = prepare_group_norm(x, num_groups, weight, bias, silu);
  check_like(grad_y, "grad_y", x, "x");
  at::Tensor dy = to_group_norm_layout(grad_y, p.shape);
  at::Tensor dx = empty_group_norm_like(x, p.shape);
  const auto acc_opts = x.options().dtype(group_norm_acc_type(x));
  at::Tensor m = mean.to(acc_opts).contiguous(), r = rstd.to(acc_opts).contiguous();
  at::Tensor sum_dz, sum_dzx;
  if (affine_grads) {
    sum_dz = at::empty({p.shape.n, p.shape.c}, acc_opts);
    sum_dzx = at::empty({p.shape.n, p.shape.c}, acc_opts);
  }
  GroupNormBwdArgs a;
  a.s = p.shape;
  a.grad_y = dy.const_data_ptr();
  a.x = p.x.const_data_ptr();
  a.weight = ptr_or_null(p.weight);
  a.bias = ptr_or_null(p.bias);
  a.mean = m.const_data_ptr();
  a.rstd = r.const_data_ptr();
  a.grad_x = dx.mutable_data_ptr();
  a.sum_dz = affine_grads ? sum_dz.mutable_data_ptr() : nullptr;
  a.sum_dzx = affine_grads ? sum_dzx.mutable_data_ptr() : nullptr;
  SGDM_CPU_DISPATCH(group_norm_silu_bwd_kernel, a);
  if (!affine_grads) return {dx, at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  return {dx, sum_dzx.sum(0), sum_dz.sum(0)};
}

}  // namespace
}  // namespace sgdm

TORCH_LIBRARY_FRAGMENT(sgdm, m) {
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, "
      "bool silu) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor? bias, int num_groups, bool silu, bool affine_grads) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgdm, CPU, m) {
  m.impl("group_norm_silu", &sgdm::forward_cpu);
  m.impl("group_norm_silu_backward", &sgdm::backward_cpu);
}
