// Host side of the Hopper wgmma forward (attention_wgmma.cuh) for fp16 and
// bf16: one configuration per (dtype, head dim). The extension takes it only
// when asked (SGDM_ATTENTION_WGMMA=1, checked in attention_launch.cpp), and
// only a build whose TORCH_CUDA_ARCH_LIST has 9.0a holds its code
// (setup.py defines SGDM_WITH_SM90A then).
//
// STATUS: never run on a GPU; benchmarks/attention_wgmma.cu checks it
// against the production kernel on the first H100 / H200 that runs
// benchmarks/gpu_check.sh.
#include "attention_cuda.h"
#include "attention_wgmma.cuh"

namespace sgdm::cuda_attn {
namespace {

// Two warpgroups (128 query rows) per CTA, 128-key blocks, FlashAttention-3's
// intra-warpgroup overlap. benchmarks/attention_wgmma.cu times the others.
template <int D>
using HopperFwd = wg::WgConfig<D, 128, 2, 1, true>;

template <class T, int D>
cudaError_t forward(const FwdParams& p, cudaStream_t stream) {
  using Cfg = HopperFwd<D>;
  constexpr int smem = Cfg::template smem_bytes<T>();
  auto* kernel = &wg::attention_fwd_wgmma<T, D, Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.nq + Cfg::kM - 1) / Cfg::kM), static_cast<unsigned>(p.bh));
  kernel<<<grid, Cfg::kThreads, smem, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), static_cast<T*>(p.out),
      p.lse, static_cast<int>(p.nq), static_cast<int>(p.nk), fwd_scale_log2(p.scale));
  return cudaGetLastError();
}

template <class T>
cudaError_t by_head_dim(const FwdParams& p, cudaStream_t stream) {
  switch (p.d) {
    case 32: return forward<T, 32>(p, stream);
    case 64: return forward<T, 64>(p, stream);
    case 128: return forward<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool wgmma_forward_built() {
#if defined(SGDM_WITH_SM90A)
  return true;
#else
  return false;
#endif
}

cudaError_t attention_forward_wgmma(const FwdParams& p, cudaStream_t stream) {
#if defined(SGDM_WITH_SM90A)
  switch (p.dtype) {
    case DType::kFloat16: return by_head_dim<__half>(p, stream);
    case DType::kBFloat16: return by_head_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
#else
  (void)p;
  (void)stream;
  return cudaErrorNoKernelImageForDevice;
#endif
}

}  // namespace sgdm::cuda_attn
