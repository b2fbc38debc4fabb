// CUDA implementation of sgdm::group_norm_silu(_backward): torch glue on the
// current stream around the torch-free kernels in group_norm_silu.cu.
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstddef>
#include <tuple>

#include "cuda/group_norm_silu.cuh"
#include "cuda/launch_error.h"
#include "group_norm_silu.h"

namespace sgdm {
namespace {

// A block holds per-channel arrays of C/G values in shared memory: with very many channels per
// group (GroupNorm(1, C) over thousands of channels) they exceed what the device gives a block.
void check_shared_memory(const GroupNormShape& s, bool backward, const char* what) {
  const size_t need = cuda::group_norm_silu_smem_bytes(s, backward);
  if (need <= 48 * 1024 || s.n * s.groups == 0 || s.hw == 0) return;  // 48 KiB: every device
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(need <= static_cast<size_t>(optin), "sgdm.", what, ": num_groups = ", s.groups, " leaves ",
              s.c / s.groups, " channels per group (C = ", s.c, "), whose statistics need ", need,
              " bytes of shared memory; cuda:", device, " gives a block ", optin,
              ". Use more groups, or SGDM_KERNELS=0 for the PyTorch reference");
}

void check_launch(cudaError_t err, const char* what) {
  check_cuda_launch(err, what, err == cudaErrorInvalidValue ? " (a group of C/G * HW elements must stay below 2^31)"
                                                            : "");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x, int64_t num_groups,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            double eps, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  GroupNormForward f = prepare_forward(x, num_groups, weight, bias, eps, silu);
  check_shared_memory(f.args.s, false, "group_norm_silu");
  check_launch(cuda::launch_group_norm_silu_fwd(f.args, c10::cuda::getCurrentCUDAStream().stream()),
               "group_norm_silu");
  return {f.y, f.mean, f.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    int64_t num_groups, bool silu, bool affine_grads) {
  const c10::cuda::CUDAGuard guard(x.device());
  // per-channel sums with shared-memory float atomics: not bit-reproducible (torch's error or warning
  // under torch.use_deterministic_algorithms)
  at::globalContext().alertNotDeterministic(
      "sgdm::group_norm_silu_backward on CUDA (per-channel sums with atomics; SGDM_KERNELS=0 runs the "
      "PyTorch reference)");
  GroupNormBackward b =
      prepare_backward(grad_y, x, mean, rstd, weight, bias, num_groups, silu, affine_grads);
  check_shared_memory(b.args.s, true, "group_norm_silu_backward");
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
