// Host side of the Hopper wgmma forward and backward (attention_wgmma.cuh,
// attention_wgmma_bwd.cuh) for fp16 and bf16: one configuration per (dtype,
// head dim) and direction. The extension takes it only
// when asked (SGDM_ATTENTION_WGMMA=1, checked in attention_launch.cpp), and
// only a build whose TORCH_CUDA_ARCH_LIST has 9.0a holds its code
// (setup.py defines SGDM_WITH_SM90A then).
//
// STATUS: never run on a GPU; benchmarks/attention_wgmma.cu checks it
// against the production kernel on the first H100 / H200 that runs
// benchmarks/gpu_check.sh.
#include "attention_cuda.h"
#include "attention_wgmma.cuh"
#include "attention_wgmma_bwd.cuh"

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

// Two warpgroups (128 keys per CTA, one set of dQ atomics for both); one for
// D = 128, whose 128 registers of dK and dV a thread leave no room for the
// exchange of dQ partials (it spills), two CTAs per SM instead.
template <int D>
using HopperBwd = wg::WgBwdConfig<D, (D > 64 ? 1 : 2), (D > 64 ? 2 : 1)>;

template <class T, int D>
cudaError_t backward(const BwdParams& p, cudaStream_t stream) {
  using Cfg = HopperBwd<D>;
  return launch_backward<T, D>(p, &wg::attention_bwd_wgmma<T, D, Cfg>, Cfg::kN, Cfg::kThreads,
                               Cfg::template smem_bytes<T>(), stream);
}

// fn<T, D>(p, stream) for the (dtype, head dim) of p.
template <template <class, int> class Fn, class Params>
cudaError_t dispatch(const Params& p, cudaStream_t stream) {
  auto by_head_dim = [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    switch (p.d) {
      case 32: return Fn<T, 32>::run(p, stream);
      case 64: return Fn<T, 64>::run(p, stream);
      case 128: return Fn<T, 128>::run(p, stream);
      default: return cudaErrorInvalidValue;
    }
  };
  switch (p.dtype) {
    case DType::kFloat16: return by_head_dim(__half{});
    case DType::kBFloat16: return by_head_dim(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}
template <class T, int D>
struct Forward {
  static cudaError_t run(const FwdParams& p, cudaStream_t stream) { return forward<T, D>(p, stream); }
};
template <class T, int D>
struct Backward {
  static cudaError_t run(const BwdParams& p, cudaStream_t stream) { return backward<T, D>(p, stream); }
};

}  // namespace

bool wgmma_built() {
#if defined(SGDM_WITH_SM90A)
  return true;
#else
  return false;
#endif
}

cudaError_t attention_forward_wgmma(const FwdParams& p, cudaStream_t stream) {
#if defined(SGDM_WITH_SM90A)
  return dispatch<Forward>(p, stream);
#else
  (void)p;
  (void)stream;
  return cudaErrorNoKernelImageForDevice;
#endif
}

cudaError_t attention_backward_wgmma(const BwdParams& p, cudaStream_t stream) {
#if defined(SGDM_WITH_SM90A)
  return dispatch<Backward>(p, stream);
#else
  (void)p;
  (void)stream;
  return cudaErrorNoKernelImageForDevice;
#endif
}

}  // namespace sgdm::cuda_attn
