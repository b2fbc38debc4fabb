// Torch-free arguments of the GroupNorm(+SiLU) kernels (CPU and CUDA).
//
// x is [N, C, *spatial] viewed as N x C x HW, stored either contiguous (NCHW)
// or channels-last (NHWC); GroupNorm normalises each of the N*G groups of
// C/G channels over the channels and all HW positions. "Acc" below is float
// for fp32/fp16/bf16 data and double for fp64 data.
//
// weight and bias are each shared ([C], stride 0) or per sample ([N, C],
// stride C): sample n, channel c reads ptr[n * stride + c]. The per-sample
// form carries the UNet's scale-shift modulation, silu(xhat * W[n, c] + B[n, c]).
#pragma once

#include <cstdint>

#include "sgdm/dtype.h"
#include "sgdm/macros.h"

namespace sgdm {

struct GroupNormShape {
  int64_t n = 0;
  int64_t c = 0;
  int64_t hw = 0;
  int64_t groups = 0;
  bool channels_last = false;
  bool silu = true;
  DType dtype = DType::kFloat32;
};

struct GroupNormFwdArgs {
  GroupNormShape s;
  double eps = 1e-5;
  const void* x = nullptr;
  const void* weight = nullptr;  // Acc [C] or [N, C], or null (= 1)
  const void* bias = nullptr;    // Acc [C] or [N, C], or null (= 0)
  int64_t weight_stride = 0;     // per-sample stride: 0 ([C]) or C ([N, C])
  int64_t bias_stride = 0;
  void* y = nullptr;
  void* mean = nullptr;  // Acc [N, G]
  void* rstd = nullptr;  // Acc [N, G], 1 / sqrt(var + eps)
};

struct GroupNormBwdArgs {
  GroupNormShape s;
  const void* grad_y = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;  // Acc [C] or [N, C], or null
  const void* bias = nullptr;    // likewise; needed to recompute the SiLU input
  int64_t weight_stride = 0;     // as in GroupNormFwdArgs
  int64_t bias_stride = 0;
  const void* mean = nullptr;    // Acc [N, G] from the forward
  const void* rstd = nullptr;
  void* grad_x = nullptr;
  // Acc [N, C] per-sample partial sums, summed over N by the caller for a
  // [C] weight / bias (an [N, C] one takes them as they are):
  //   sum_dz[n, c]  = sum_hw dL/dz          (-> grad_bias)
  //   sum_dzx[n, c] = sum_hw dL/dz * xhat    (-> grad_weight)
  // where z = xhat * weight + bias is the GroupNorm output before SiLU.
  void* sum_dz = nullptr;
  void* sum_dzx = nullptr;
};

// Sample n's row of a weight / bias given with its per-sample stride (above);
// null (absent) stays null.
template <typename Acc>
SGDM_INLINE const Acc* affine_row(const void* p, int64_t stride, int64_t n) {
  return p == nullptr ? nullptr : static_cast<const Acc*>(p) + n * stride;
}

}  // namespace sgdm
