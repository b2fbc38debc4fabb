// CUDA implementation of sgdm::group_norm_silu(_backward): torch glue on the
// current stream around the torch-free kernels in group_norm_silu.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/group_norm_silu.cuh"
#include "group_norm_silu.h"

namespace sgdm {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "sgdm.", what, ": CUDA launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (a group of C/G * HW elements must stay below 2^31)"
                                           : "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, int64_t num_groups,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            double eps, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  GroupNormForward f = prepare_forward(x, num_groups, weight, bias, eps, silu);
  check_launch(cuda::launch_group_norm_silu_fwd(f.args, c10::cuda::getCurrentCUDAStream().stream()),
               "group_norm_silu");
  return {f.y, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, bool silu, bool affine_grads) {
  const c10::cuda::CUDAGuard guard(x.device());
  GroupNormBackward b =
      prepare_backward(grad_y, x, mean, rstd, weight, bias, num_groups, silu, affine_grads);
  check_launch(cuda::launch_group_norm_silu_bwd(b.args, c10::cuda::getCurrentCUDAStream().stream()),
               "group_norm_silu_backward");
  return b.result();
}

}  // namespace
}  // namespace sgdm

TORCH_LIBRARY_IMPL(sgdm, CUDA, m) {
  m.impl("group_norm_silu", &sgdm::forward_cuda);
  m.impl("group_norm_silu_backward", &sgdm::backward_cuda);
}
