// The probe behind sgdm::_cuda_kernels_run_on (device_support_launch.cpp).
#include <cuda_runtime_api.h>

#include "device_support.cuh"

namespace sgdm::cuda {
namespace {

__global__ void probe_kernel() {}

}  // namespace

bool kernels_run_on_current_device() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err != cudaSuccess) (void)cudaGetLastError();  // not sticky: clear it, or the next launch check reads it
  return err == cudaSuccess;
}

}  // namespace sgdm::cuda
