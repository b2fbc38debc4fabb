// Guided DDIM step, CUDA kernel (torch-free; raw pointers). The maths is
// sgdm/guided_ddim.h, shared with the CPU kernel. One read of each input,
// one write of each output, in 16-byte vectors when every sample's slice is
// 16-byte aligned; blockIdx.y picks the sample. Each thread derives the
// sample's coefficients itself, after its loads are issued, so no block
// waits on a barrier before touching memory.
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

template <typename Acc>
__device__ __forceinline__ DdimCoeffs<Acc> sample_coeffs(const GuidedDdimArgs& a, int64_t sample) {
  const double a_t = a.alpha_t ? a.alpha_t[sample] : a.alpha_t_scalar;
  const double a_p = a.alpha_prev ? a.alpha_prev[sample] : a.alpha_prev_scalar;
  return ddim_coeffs<Acc>(a_t, a_p, a.eta);
}

// Units of kVec elements (kVec > 1: per_sample % kVec == 0 and 16-byte
// aligned tensors, checked by the launcher).
template <typename T, int kVec, bool kUncond, bool kNoise, bool kClip>
__global__ void __launch_bounds__(kDdimThreads)
guided_ddim_step_kernel(GuidedDdimArgs a) {
  using Acc = acc_t<T>;
  const Acc w = static_cast<Acc>(a.guidance_scale), clip = static_cast<Acc>(a.clip_value);
  const int64_t units = a.per_sample / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t sample = blockIdx.y; sample < a.batch; sample += gridDim.y) {
    const int64_t base = sample * a.per_sample;
    DdimCoeffs<Acc> c{};
    bool have_coeffs = false;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += stride) {
      const int64_t i = base + u * kVec;
      const Vec<T, kVec> xv = load_vec<T, kVec>(static_cast<const T*>(a.x) + i);
      const Vec<T, kVec> ecv = load_vec<T, kVec>(static_cast<const T*>(a.eps_cond) + i);
      Vec<T, kVec> euv{}, nzv{};
      if constexpr (kUncond) euv = load_vec<T, kVec>(static_cast<const T*>(a.eps_uncond) + i);
      if constexpr (kNoise) nzv = load_vec<T, kVec>(static_cast<const T*>(a.noise) + i);
      if (!have_coeffs) {
        c = sample_coeffs<Acc>(a, sample);
        have_coeffs = true;
      }
      Vec<T, kVec> xpv, x0v;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const Acc xval = to_acc<Acc>(xv.v[k]);
        Acc eps = to_acc<Acc>(ecv.v[k]);
        if constexpr (kUncond) eps = guided_eps(eps, to_acc<Acc>(euv.v[k]), w);
        Acc x0 = ddim_x0(xval, eps, c.sqrt_1m_at, c.inv_sqrt_at);
        if constexpr (kClip) {
          x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);
          if (c.inv_sqrt_1m_at != Acc(0)) eps = ddim_eps_from_x0(xval, x0, c.sqrt_at, c.inv_sqrt_1m_at);
        }
        Acc out = ddim_x_prev(x0, eps, c.sqrt_ap, c.dir);
        if constexpr (kNoise) out += c.sigma * to_acc<Acc>(nzv.v[k]);
        xpv.v[k] = from_acc<T>(out);
        x0v.v[k] = from_acc<T>(x0);
      }
      store_vec<T, kVec>(static_cast<T*>(a.x_prev) + i, xpv);
      store_vec<T, kVec>(static_cast<T*>(a.x0) + i, x0v);
    }
  }
}

}  // namespace sgdm::cuda
#endif  // __CUDACC__
