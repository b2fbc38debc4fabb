// Guided DDIM step, CUDA kernel (torch-free; raw pointers). The maths is
// sgdm/guided_ddim.h, shared with the CPU kernel. One read of each input,
// one write of each output; blockIdx.y picks the sample so the per-sample
// coefficients are computed once per block.
#pragma once

#include <cuda_runtime_api.h>

#include "sgdm/guided_ddim_args.h"

namespace sgdm::cuda {

// Launches on `stream`; returns the launch error (cudaSuccess when fine).
cudaError_t launch_guided_ddim_step(const GuidedDdimArgs& args, cudaStream_t stream);

}  // namespace sgdm::cuda

#ifdef __CUDACC__
#include "common.cuh"
#include "sgdm/guided_ddim.h"

namespace sgdm::cuda {

constexpr int kDdimThreads = 256;
constexpr int kDdimUnroll = 4;  // independent loads in flight per thread

template <typename T, bool kUncond, bool kNoise, bool kClip>
__global__ void
guided_ddim_step_kernel(GuidedDdimArgs a) {
  using Acc = acc_t<T>;
  __shared__ DdimCoeffs<Acc> coeffs;
  for (int64_t sample = blockIdx.y; sample < a.batch; sample += gridDim.y) {
    __syncthreads();  // the previous sample's coefficients are no longer read
    if (threadIdx.x == 0) {
      const double a_t = a.alpha_t ? a.alpha_t[sample] : a.alpha_t_scalar;
      const double a_p = a.alpha_prev ? a.alpha_prev[sample] : a.alpha_prev_scalar;
      coeffs = ddim_coeffs<Acc>(a_t, a_p, a.eta);
    }
    __syncthreads();
    const DdimCoeffs<Acc> c = coeffs;
    const Acc w = static_cast<Acc>(a.guidance_scale), clip = static_cast<Acc>(a.clip_value);
    const int64_t base = sample * a.per_sample;
    const T* x = static_cast<const T*>(a.x) + base;
    const T* ec = static_cast<const T*>(a.eps_cond) + base;
    const T* eu = static_cast<const T*>(a.eps_uncond) + base;
    const T* nz = static_cast<const T*>(a.noise) + base;
    T* xp = static_cast<T*>(a.x_prev) + base;
    T* x0p = static_cast<T*>(a.x0) + base;
    const int64_t tile = static_cast<int64_t>(blockDim.x) * kDdimUnroll;
    for (int64_t start = blockIdx.x * tile; start < a.per_sample; start += gridDim.x * tile) {
#pragma unroll
      for (int u = 0; u < kDdimUnroll; ++u) {
        const int64_t i = start + u * static_cast<int64_t>(blockDim.x) + threadIdx.x;
        if (i >= a.per_sample) break;
        const Acc xv = to_acc<Acc>(ldg(x + i));
        Acc eps = to_acc<Acc>(ldg(ec + i));
        if constexpr (kUncond) eps = guided_eps(eps, to_acc<Acc>(ldg(eu + i)), w);
        Acc x0 = ddim_x0(xv, eps, c.sqrt_1m_at, c.inv_sqrt_at);
        if constexpr (kClip) {
          x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);
          if (c.inv_sqrt_1m_at != Acc(0)) eps = ddim_eps_from_x0(xv, x0, c.sqrt_at, c.inv_sqrt_1m_at);
        }
        Acc out = ddim_x_prev(x0, eps, c.sqrt_ap, c.dir);
        if constexpr (kNoise) out += c.sigma * to_acc<Acc>(ldg(nz + i));
        xp[i] = from_acc<T>(out);
        x0p[i] = from_acc<T>(x0);
      }
    }
  }
}

}  // namespace sgdm::cuda
#endif  // __CUDACC__
