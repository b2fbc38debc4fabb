// Torch-free element-type tag passed from the op glue to the CPU and CUDA
// kernels, so kernel files need no torch headers.
#pragma once

namespace sgdm {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

}  // namespace sgdm
