// sgdm::_cuda_kernels_run_on(device): whether this build's CUDA code runs on
// GPU `device`. sgdm/ops/_extension.py asks once per visible GPU before the
// first kernel, and runs the references where the answer is no, instead of
// failing every launch with "no kernel image is available".
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/device_support.cuh"

namespace sgdm {
namespace {

bool kernels_run_on(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return cuda::kernels_run_on_current_device();
}

}  // namespace
}  // namespace sgdm

TORCH_LIBRARY_FRAGMENT(sgdm, m) { m.def("_cuda_kernels_run_on(int device) -> bool", &sgdm::kernels_run_on); }
