// Host-side launches shared by the attention kernels' translation units
// (attention.cu, attention_hopper.cu) and the A/B programs: grids, the
// dispatch on head dim and dtype, and the passes around a tensor-core
// backward. nvcc only (kernel launches); the CPU emulation of the wgmma
// kernels does without it.
#pragma once

#include <type_traits>

#include "attention_bwd.cuh"
#include "attention_cuda.h"
#include "attention_fwd.cuh"

namespace sgdm::cuda_attn {

inline dim3 grid(int64_t rows, int64_t rows_per_cta, int64_t bh) {
  return dim3(static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta), static_cast<unsigned>(bh));
}

// fn(std::integral_constant<int, D>{}) for the head dim of p (32, 64 or 128).
template <class Params, class Fn>
cudaError_t by_head_dim(const Params& p, Fn&& fn) {
  switch (p.d) {
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

// fn(T{}, std::integral_constant<int, D>{}) for a 16-bit p (fp16 or bf16) and its head dim.
template <class Params, class Fn>
cudaError_t by_half_dtype_and_head_dim(const Params& p, Fn&& fn) {
  return by_head_dim(p, [&](auto d) -> cudaError_t {
    switch (p.dtype) {
      case DType::kFloat16: return fn(__half{}, d);
      case DType::kBFloat16: return fn(__nv_bfloat16{}, d);
      default: return cudaErrorInvalidValue;
    }
  });
}

// A tensor-core forward: `kernel` (the contract of attention_fwd_mma) over
// ceil(nq / rows_per_cta) x B*H CTAs.
template <class T, class Kernel>
cudaError_t launch_forward(const FwdParams& p, Kernel* kernel, int rows_per_cta, int threads, int smem,
                           cudaStream_t stream) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid(p.nq, rows_per_cta, p.bh), threads, smem, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<T*>(p.out),
      p.lse, static_cast<int>(p.nq), static_cast<int>(p.nk), fwd_scale_log2(p.scale));
  return cudaGetLastError();
}

// delta for `rows` query rows and, given dq_accum, its zeroed rows.
template <class T, int D>
cudaError_t launch_bwd_preprocess(const T* dout, const T* out, const float* grad_lse, float* delta, float* dq_accum,
                                  int64_t rows, cudaStream_t stream) {
  constexpr int64_t kThreads = 256, kLanes = D / (16 / static_cast<int64_t>(sizeof(T)));
  const int64_t blocks = (rows * kLanes + kThreads - 1) / kThreads;
  attention_bwd_preprocess<T, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(dout, out, grad_lse, delta,
                                                                                          dq_accum, rows);
  return cudaGetLastError();
}

// dq = scale * dq_accum for n elements (a multiple of 4).
template <class T>
cudaError_t launch_dq_convert(const float* dq_accum, T* dq, float scale, int64_t n, cudaStream_t stream) {
  const int64_t n4 = n / 4;
  attention_dq_convert<T><<<static_cast<unsigned>((n4 + 255) / 256), 256, 0, stream>>>(dq_accum, dq, scale, n4);
  return cudaGetLastError();
}

// A tensor-core backward: the preprocessing, `kernel` (the contract of
// attention_bwd_mma) over ceil(nk / keys_per_cta) x B*H CTAs, the dQ conversion.
template <class T, int D, class Kernel>
cudaError_t launch_backward(const BwdParams& p, Kernel* kernel, int keys_per_cta, int threads, int smem,
                            cudaStream_t stream) {
  cudaError_t err = launch_bwd_preprocess<T, D>(static_cast<const T*>(p.dout), static_cast<const T*>(p.out),
                                                p.grad_lse, p.delta, p.dq_accum, p.bh * p.nq, stream);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid(p.nk, keys_per_cta, p.bh), threads, smem, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v),
      static_cast<const T*>(p.dout), p.lse, p.delta, p.dq_accum, static_cast<T*>(p.dk), static_cast<T*>(p.dv),
      static_cast<int>(p.nq), static_cast<int>(p.nk), p.scale);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_dq_convert<T>(p.dq_accum, static_cast<T*>(p.dq), p.scale, p.bh * p.nq * p.d, stream);  // d % 4 == 0
}

}  // namespace sgdm::cuda_attn
