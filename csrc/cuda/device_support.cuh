// Whether this build's CUDA code runs on a device (torch-free; see device_support.cu).
#pragma once

namespace sgdm::cuda {

// True when the current device can load this build's kernels. The probe is a
// kernel compiled like every other (same TORCH_CUDA_ARCH_LIST), so the answer
// covers a device older than the build (a T4 runs no sm_80 code) and one newer
// than it (a Blackwell GPU runs no sm_80 / sm_90 code without PTX) alike.
bool kernels_run_on_current_device();

}  // namespace sgdm::cuda
