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
#include "attention_host.cuh"
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
  return launch_forward<T>(p, &wg::attention_fwd_wgmma<T, D, Cfg>, Cfg::kM, Cfg::kThreads,
                           Cfg::template smem_bytes<T>(), stream);
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

}  // namespace

#if defined(SGDM_WITH_SM90A)
bool wgmma_built() { return true; }

cudaError_t attention_forward_wgmma(const FwdParams& p, cudaStream_t stream) {
  return by_half_dtype_and_head_dim(
      p, [&](auto t, auto d) { return forward<decltype(t), decltype(d)::value>(p, stream); });
}

cudaError_t attention_backward_wgmma(const BwdParams& p, cudaStream_t stream) {
  return by_half_dtype_and_head_dim(
      p, [&](auto t, auto d) { return backward<decltype(t), decltype(d)::value>(p, stream); });
}
#else  // no sm_90a code in this build: nothing to launch
bool wgmma_built() { return false; }
cudaError_t attention_forward_wgmma(const FwdParams&, cudaStream_t) { return cudaErrorNoKernelImageForDevice; }
cudaError_t attention_backward_wgmma(const BwdParams&, cudaStream_t) { return cudaErrorNoKernelImageForDevice; }
#endif

}  // namespace sgdm::cuda_attn
