// sgdm::guided_ddim_step: schema and CPU implementation (glue only; the
// kernel is csrc/cpu/guided_ddim_step_kernel.cpp, the CUDA one
// csrc/cuda/guided_ddim_step.cu). Maths: csrc/include/sgdm/guided_ddim.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/guided_ddim_step_kernel.h"
#include "guided_ddim_step.h"
#include "op_utils.h"

namespace sgdm {
namespace {

// Contiguous or channels-last with identical strides everywhere: each sample
// is one dense run of memory, so the kernel treats every tensor as [B, M]
// and the outputs keep the input layout (empty_like preserves it).
bool same_dense_layout(const at::Tensor& x, std::initializer_list<const at::Tensor*> others) {
  const bool dense = x.is_contiguous() ||
                     (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                     (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  if (!dense) return false;
  for (const at::Tensor* t : others) {
    if (t->defined() && t->strides() != x.strides()) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> step_cpu(const at::Tensor& x_t, const at::Tensor& eps_cond,
                                            const std::optional<at::Tensor>& eps_uncond,
                                            const std::optional<at::Tensor>& noise,
                                            const std::optional<at::Tensor>& alpha_bar_t,
                                            const std::optional<at::Tensor>& alpha_bar_prev,
                                            double alpha_bar_t_scalar, double alpha_bar_prev_scalar,
                                            double guidance_scale, double eta,
                                            std::optional<double> clip_x0) {
  GuidedDdimPrepared p = prepare_guided_ddim(x_t, eps_cond, eps_uncond, noise, alpha_bar_t,
                                             alpha_bar_prev, alpha_bar_t_scalar,
                                             alpha_bar_prev_scalar, guidance_scale, eta, clip_x0);
  SGDM_CPU_DISPATCH(guided_ddim_step_kernel, p.args);
  return {p.x_prev, p.x0};
}

// Per-sample alphas on the CPU: each in (0, 1], as the scalars are checked; and, with eta > 0 and no
// noise (need_noise_free), no sample with sigma_t > 0 (a_t < a_prev < 1), which the step would take
// without its noise term. On a GPU reading them would wait for the device: there the Python layer
// checks (with torch._assert_async under torch.compile).
void check_host_alphas(const GuidedDdimPrepared& p, double a_t_scalar, double a_prev_scalar, int64_t batch,
                       bool need_noise_free) {
  const at::Tensor* tensors[] = {&p.alpha_t, &p.alpha_prev};
  for (const at::Tensor* t : tensors) {
    if (t->defined() && !t->is_cpu()) return;
  }
  const double* at = p.alpha_t.defined() ? p.alpha_t.const_data_ptr<double>() : nullptr;
  const double* ap = p.alpha_prev.defined() ? p.alpha_prev.const_data_ptr<double>() : nullptr;
  const int64_t n = (at || ap) ? batch : 1;  // per-sample: each sample; scalars: once
  for (int64_t i = 0; i < n; ++i) {
    const double a = at ? at[i] : a_t_scalar;
    const double b = ap ? ap[i] : a_prev_scalar;
    TORCH_CHECK_VALUE(a > 0.0 && a <= 1.0, "sgdm.guided_ddim_step: alpha_bar_t must lie in (0, 1], got ", a,
                      " for sample ", i);
    TORCH_CHECK_VALUE(b > 0.0 && b <= 1.0, "sgdm.guided_ddim_step: alpha_bar_prev must lie in (0, 1], got ", b,
                      " for sample ", i);
    TORCH_CHECK_VALUE(!(need_noise_free && a < 1.0 && b < 1.0 && a < b),
                      "sgdm.guided_ddim_step: noise is required when eta > 0 (sigma_t > 0); draw it with "
                      "torch.randn(..., generator=...)");
  }
}

}  // namespace

GuidedDdimPrepared prepare_guided_ddim(
    const at::Tensor& x_t, const at::Tensor& eps_cond, const std::optional<at::Tensor>& eps_uncond,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& alpha_bar_t,
    const std::optional<at::Tensor>& alpha_bar_prev, double alpha_bar_t_scalar,
    double alpha_bar_prev_scalar, double guidance_scale, double eta, std::optional<double> clip_x0) {
  TORCH_CHECK(x_t.dim() >= 1, "sgdm.guided_ddim_step: x_t must have a batch dimension, got shape ",
              x_t.sizes());
  GuidedDdimPrepared p;
  GuidedDdimArgs& a = p.args;
  a.dtype = dtype_tag(x_t, "x_t");
  check_like(eps_cond, "eps_cond", x_t, "x_t");
  at::Tensor eu = eps_uncond.value_or(at::Tensor());
  at::Tensor nz = eta != 0.0 ? noise.value_or(at::Tensor()) : at::Tensor();
  if (eu.defined()) check_like(eu, "eps_uncond", x_t, "x_t");
  if (nz.defined()) check_like(nz, "noise", x_t, "x_t");
  const int64_t batch = x_t.size(0);
  auto alpha = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch, "sgdm.guided_ddim_step: ", name,
                " must be a float or a tensor of shape [", batch, "], got shape ", t->sizes());
    TORCH_CHECK(t->device() == x_t.device(), "sgdm.guided_ddim_step: ", name, " is on ",
                t->device(), " but x_t is on ", x_t.device());
    return t->to(at::kDouble).contiguous();
  };
  auto check_scalar = [](double v, const char* name) {
    TORCH_CHECK(v > 0.0 && v <= 1.0, "sgdm.guided_ddim_step: ", name, " must lie in (0, 1], got ", v);
  };
  TORCH_CHECK_VALUE(eta >= 0.0 && eta <= 1.0, "sgdm.guided_ddim_step: eta must lie in [0, 1] (above 1, "
                    "1 - alpha_bar_prev - sigma_t^2 turns negative), got ", eta);
  TORCH_CHECK_VALUE(std::isfinite(guidance_scale), "sgdm.guided_ddim_step: guidance_scale must be finite, got ",
                    guidance_scale);
  TORCH_CHECK_VALUE(!clip_x0.has_value() || (std::isfinite(*clip_x0) && *clip_x0 > 0.0),
                    "sgdm.guided_ddim_step: clip_x0 must be a finite number > 0, got ", clip_x0.value_or(0.0));
  if (!alpha_bar_t.has_value()) check_scalar(alpha_bar_t_scalar, "alpha_bar_t");
  if (!alpha_bar_prev.has_value()) check_scalar(alpha_bar_prev_scalar, "alpha_bar_prev");
  p.alpha_t = alpha(alpha_bar_t, "alpha_bar_t");
  p.alpha_prev = alpha(alpha_bar_prev, "alpha_bar_prev");
  check_host_alphas(p, alpha_bar_t_scalar, alpha_bar_prev_scalar, batch, eta != 0.0 && !nz.defined());
  at::Tensor x = x_t, ec = eps_cond;
  if (!same_dense_layout(x, {&ec, &eu, &nz})) {
    x = x.contiguous();
    ec = ec.contiguous();
    if (eu.defined()) eu = eu.contiguous();
    if (nz.defined()) nz = nz.contiguous();
  }
  p.inputs = {x, ec, eu, nz};
  p.x_prev = at::empty_like(x);
  p.x0 = at::empty_like(x);
  a.batch = batch;
  a.per_sample = batch > 0 ? x.numel() / batch : 0;
  a.x = x.const_data_ptr();
  a.eps_cond = ec.const_data_ptr();
  a.eps_uncond = eu.defined() ? eu.const_data_ptr() : nullptr;
  a.noise = nz.defined() ? nz.const_data_ptr() : nullptr;
  a.alpha_t = p.alpha_t.defined() ? p.alpha_t.const_data_ptr<double>() : nullptr;
  a.alpha_prev = p.alpha_prev.defined() ? p.alpha_prev.const_data_ptr<double>() : nullptr;
  a.alpha_t_scalar = alpha_bar_t_scalar;
  a.alpha_prev_scalar = alpha_bar_prev_scalar;
  a.guidance_scale = guidance_scale;
  a.eta = eta;
  a.clip = clip_x0.has_value();
  a.clip_value = clip_x0.value_or(0.0);
  a.x_prev = p.x_prev.mutable_data_ptr();
  a.x0 = p.x0.mutable_data_ptr();
  return p;
}

}  // namespace sgdm

TORCH_LIBRARY_FRAGMENT(sgdm, m) {
  m.def(
      "guided_ddim_step(Tensor x_t, Tensor eps_cond, Tensor? eps_uncond, Tensor? noise, "
      "Tensor? alpha_bar_t, Tensor? alpha_bar_prev, float alpha_bar_t_scalar, "
      "float alpha_bar_prev_scalar, float guidance_scale, float eta, float? clip_x0) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgdm, CPU, m) { m.impl("guided_ddim_step", &sgdm::step_cpu); }
