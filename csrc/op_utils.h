// Small helpers shared by the op glue files (csrc/<op>.cpp and
// csrc/cuda/<op>_launch.cpp): argument checks that name the argument, and
// the torch dtype -> sgdm::DType tag.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "sgdm/dtype.h"

namespace sgdm {

inline DType dtype_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "sgdm: ", name, " must be float32, float16, bfloat16 or float64, got ",
                       t.scalar_type());
  }
}

// `other` must match `ref` in dtype, device and shape.
inline void check_like(const at::Tensor& other, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK(other.device() == ref.device(), "sgdm: ", name, " is on ", other.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK_TYPE(other.scalar_type() == ref.scalar_type(), "sgdm: ", name, " has dtype ",
                   other.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(other.sizes() == ref.sizes(), "sgdm: ", name, " has shape ", other.sizes(), " but ",
              ref_name, " has ", ref.sizes());
}

}  // namespace sgdm
