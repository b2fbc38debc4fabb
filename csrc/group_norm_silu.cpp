// sgdm::group_norm_silu and its backward: schemas and CPU implementation
// (glue only; kernels in csrc/cpu/group_norm_silu_kernel.cpp and
// csrc/cuda/group_norm_silu.cu). Autograd and fake kernels are registered in
// sgdm/ops/group_norm_silu.py.
#include "group_norm_silu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
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
  // The NHWC view only for non-contiguous x: building it costs a few us per call, twice per
  // GroupNorm in a training step.
  s.channels_last = x.dim() > 2 && !x.is_contiguous() && x.movedim(1, -1).is_contiguous();
  p.x = s.channels_last ? x : x.contiguous();
  const at::ScalarType acc = group_norm_acc_type(x);
  auto affine = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    const bool shared = t->dim() == 1 && t->size(0) == s.c;
    const bool per_sample = t->dim() == 2 && t->size(0) == s.n && t->size(1) == s.c;
    TORCH_CHECK(shared || per_sample, "sgdm.group_norm_silu: ", name, " must have shape [C] = [", s.c,
                "] or [N, C] = [", s.n, ", ", s.c, "], got ", t->sizes());
    TORCH_CHECK(t->device() == x.device(), "sgdm.group_norm_silu: ", name, " is on ",
                t->device(), " but x is on ", x.device());
    dtype_tag(*t, name);
    return t->to(acc).contiguous();
  };
  p.weight = affine(weight, "weight");
  p.bias = affine(bias, "bias");
  p.weight_stride = p.weight.defined() && p.weight.dim() == 2 ? s.c : 0;
  p.bias_stride = p.bias.defined() && p.bias.dim() == 2 ? s.c : 0;
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

}  // namespace

GroupNormForward prepare_forward(const at::Tensor& x, int64_t num_groups,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps, bool silu) {
  // eps = 0 gives rstd = inf on a constant group (NaN out), eps < 0 a NaN rstd
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0,
              "sgdm.group_norm_silu: eps must be a positive finite number, got ", eps);
  GroupNormForward f;
  f.p = prepare_group_norm(x, num_groups, weight, bias, silu);
  f.y = empty_group_norm_like(x, f.p.shape);
  const auto stat_opts = x.options().dtype(group_norm_acc_type(x));
  f.mean = at::empty({f.p.shape.n, num_groups}, stat_opts);
  f.rstd = at::empty({f.p.shape.n, num_groups}, stat_opts);
  if (f.p.shape.hw == 0) {  // no elements: the kernels launch nothing; the statistics of an empty group
    f.mean.zero_();
    f.rstd.fill_(1.0 / std::sqrt(eps));
  }
  GroupNormFwdArgs& a = f.args;
  a.s = f.p.shape;
  a.eps = eps;
  a.x = f.p.x.const_data_ptr();
  a.weight = ptr_or_null(f.p.weight);
  a.bias = ptr_or_null(f.p.bias);
  a.weight_stride = f.p.weight_stride;
  a.bias_stride = f.p.bias_stride;
  a.y = f.y.mutable_data_ptr();
  a.mean = f.mean.mutable_data_ptr();
  a.rstd = f.rstd.mutable_data_ptr();
  return f;
}

GroupNormBackward prepare_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& mean, const at::Tensor& rstd,
                                   const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, int64_t num_groups,
                                   bool silu, bool affine_grads) {
  GroupNormBackward b;
  b.p = prepare_group_norm(x, num_groups, weight, bias, silu);
  check_like(grad_y, "grad_y", x, "x");
  const auto acc_opts = x.options().dtype(group_norm_acc_type(x));
  TORCH_CHECK(mean.numel() == b.p.shape.n * num_groups && rstd.numel() == mean.numel(),
              "sgdm.group_norm_silu_backward: mean and rstd must have N * num_groups = ",
              b.p.shape.n * num_groups, " elements, got ", mean.numel(), " and ", rstd.numel());
  TORCH_CHECK(mean.device() == x.device() && rstd.device() == x.device(),
              "sgdm.group_norm_silu_backward: mean and rstd must be on ", x.device());
  b.dy = to_group_norm_layout(grad_y, b.p.shape);
  b.dx = empty_group_norm_like(x, b.p.shape);
  b.mean = mean.to(acc_opts).contiguous();
  b.rstd = rstd.to(acc_opts).contiguous();
  if (affine_grads) {
    b.sum_dz = at::empty({b.p.shape.n, b.p.shape.c}, acc_opts);
    b.sum_dzx = at::empty({b.p.shape.n, b.p.shape.c}, acc_opts);
    if (b.p.shape.hw == 0) {  // nothing to sum (the kernels launch nothing for hw = 0)
      b.sum_dz.zero_();
      b.sum_dzx.zero_();
    }
  }
  GroupNormBwdArgs& a = b.args;
  a.s = b.p.shape;
  a.grad_y = b.dy.const_data_ptr();
  a.x = b.p.x.const_data_ptr();
  a.weight = ptr_or_null(b.p.weight);
  a.bias = ptr_or_null(b.p.bias);
  a.weight_stride = b.p.weight_stride;
  a.bias_stride = b.p.bias_stride;
  a.mean = b.mean.const_data_ptr();
  a.rstd = b.rstd.const_data_ptr();
  a.grad_x = b.dx.mutable_data_ptr();
  a.sum_dz = affine_grads ? b.sum_dz.mutable_data_ptr() : nullptr;
  a.sum_dzx = affine_grads ? b.sum_dzx.mutable_data_ptr() : nullptr;
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> GroupNormBackward::result() const {
  if (!sum_dz.defined()) {
    const auto opts = dx.options().dtype(group_norm_acc_type(dx));
    return {dx, at::empty({0}, opts), at::empty({0}, opts)};
  }
  // A shared ([C]) weight / bias sums the per-sample sums over N; a per-sample one keeps them.
  return {dx, p.weight_stride ? sum_dzx : sum_dzx.sum(0), p.bias_stride ? sum_dz : sum_dz.sum(0)};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x, int64_t num_groups,
                                                           const std::optional<at::Tensor>& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           double eps, bool silu) {
  GroupNormForward f = prepare_forward(x, num_groups, weight, bias, eps, silu);
  SGDM_CPU_DISPATCH(group_norm_silu_fwd_kernel, f.args);
  return {f.y, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, bool silu, bool affine_grads) {
  GroupNormBackward b =
      prepare_backward(grad_y, x, mean, rstd, weight, bias, num_groups, silu, affine_grads);
  SGDM_CPU_DISPATCH(group_norm_silu_bwd_kernel, b.args);
  return b.result();
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
