// The error of a failed CUDA launch, raised by the op glue (csrc/cuda/*_launch.cpp)
// on the device its guard set: it names the op, and where this build holds no
// code for the device (setup.py builds the TORCH_CUDA_ARCH_LIST it was given,
// or only the build machine's GPU), says which device and what to do, instead
// of a bare "no kernel image is available for execution on the device".
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace sgdm {

inline void check_cuda_launch(cudaError_t err, const char* op, const char* hint = "") {
  if (err == cudaSuccess) return;
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
      err == cudaErrorUnsupportedPtxVersion) {
    int device = -1, major = 0, minor = 0;
    if (cudaGetDevice(&device) == cudaSuccess) {
      (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
      (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    }
    TORCH_CHECK(false, "sgdm.", op, ": this build of sgdm has no CUDA code for cuda:", device,
                " (compute capability ", major, ".", minor, "; ", cudaGetErrorString(err),
                "). Rebuild with it in TORCH_CUDA_ARCH_LIST (the kernels need 8.0 or newer), or set "
                "SGDM_KERNELS=0 to run the PyTorch references");
  }
  TORCH_CHECK(false, "sgdm.", op, ": CUDA launch failed: ", cudaGetErrorString(err), hint);
}

}  // namespace sgdm
