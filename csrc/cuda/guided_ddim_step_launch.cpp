// CUDA implementation of sgdm::guided_ddim_step: torch glue on the current
// stream around the torch-free kernel in guided_ddim_step.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/guided_ddim_step.cuh"
#include "cuda/launch_error.h"
#include "guided_ddim_step.h"

namespace sgdm {
namespace {

std::tuple<at::Tensor, at::Tensor> step_cuda(const at::Tensor& x_t, const at::Tensor& eps_cond,
                                             const std::optional<at::Tensor>& eps_uncond,
                                             const std::optional<at::Tensor>& noise,
                                             const std::optional<at::Tensor>& alpha_bar_t,
                                             const std::optional<at::Tensor>& alpha_bar_prev,
                                             double alpha_bar_t_scalar,
                                             double alpha_bar_prev_scalar, double guidance_scale,
                                             double eta, std::optional<double> clip_x0) {
  const c10::cuda::CUDAGuard guard(x_t.device());
  GuidedDdimPrepared p = prepare_guided_ddim(x_t, eps_cond, eps_uncond, noise, alpha_bar_t,
                                             alpha_bar_prev, alpha_bar_t_scalar,
                                             alpha_bar_prev_scalar, guidance_scale, eta, clip_x0);
  check_cuda_launch(cuda::launch_guided_ddim_step(p.args, c10::cuda::getCurrentCUDAStream().stream()),
                    "guided_ddim_step");
  return {p.x_prev, p.x0};
}

}  // namespace
}  // namespace sgdm

TORCH_LIBRARY_IMPL(sgdm, CUDA, m) { m.impl("guided_ddim_step", &sgdm::step_cuda); }
