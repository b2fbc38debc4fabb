// Host side of the Hopper wgmma forward and backward (attention_wgmma.cuh,
// attention_wgmma_bwd.cuh) for fp16 and bf16: the configuration per (dtype,
// head dim, direction, grid size). attention_launch.cpp runs them on a compute
// capability 9.0 GPU unless SGDM_ATTENTION_WGMMA=0, and only a build whose
// TORCH_CUDA_ARCH_LIST has 9.0a holds their code (setup.py defines
// SGDM_WITH_SM90A then).
//
// The choices come from benchmarks/attention_wgmma.cu on an H200 (2026-11-28,
// benchmarks/RESULTS.md), where every configuration below agreed with the
// mma.sync kernels. A grid of fewer CTAs than the GPU has SMs runs the
// configuration with the fewest key blocks per CTA (the forward) or the most
// CTAs (the backward): with one wave that is not even full, the time is one
// CTA's latency.
#include "attention_host.cuh"
#include "attention_wgmma.cuh"
#include "attention_wgmma_bwd.cuh"

namespace sgdm::cuda_attn {

#if defined(SGDM_WITH_SM90A)
namespace {

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 132;  // an H100 SXM / H200; only the choice of configuration depends on it
  }
  return sms;
}

bool fills_the_gpu(int64_t rows, int rows_per_cta, int64_t bh) {
  return bh * ((rows + rows_per_cta - 1) / rows_per_cta) >= sm_count();
}

// Forward: two warpgroups (128 query rows) per CTA. H200, bf16, B*H = 64, N = 4096,
// against the mma.sync kernel: D = 64 with 64-key blocks and 2 CTAs per SM 1.27x
// (128-key blocks 1.00x, with FlashAttention-3's overlap 0.91x); D = 32 the same
// 1.03x (128-key blocks 0.80x); D = 128 128-key blocks with the overlap 1.43x.
// On grids under one wave (B*H = 5, N = 1000) 128-key blocks without the overlap:
// 1.44x at D = 64 (64-key blocks 1.33x), 1.46x at D = 32.
template <int D>
using HopperFwdFull = std::conditional_t<D == 128, wg::WgConfig<128, 128, 2, 1, true>, wg::WgConfig<D, 64, 2, 2>>;
template <int D>
using HopperFwdSmall = std::conditional_t<D == 128, wg::WgConfig<128, 128, 2, 1, true>, wg::WgConfig<D, 128, 2, 1>>;

template <class T, int D, class Cfg>
cudaError_t forward_with(const FwdParams& p, cudaStream_t stream) {
  return launch_forward<T>(p, &wg::attention_fwd_wgmma<T, D, Cfg>, Cfg::kM, Cfg::kThreads,
                           Cfg::template smem_bytes<T>(), stream);
}

template <class T, int D>
cudaError_t forward(const FwdParams& p, cudaStream_t stream) {
  static_assert(HopperFwdFull<D>::kM == HopperFwdSmall<D>::kM, "one grid for both configurations");
  if (std::is_same_v<HopperFwdFull<D>, HopperFwdSmall<D>> || fills_the_gpu(p.nq, HopperFwdFull<D>::kM, p.bh)) {
    return forward_with<T, D, HopperFwdFull<D>>(p, stream);
  }
  return forward_with<T, D, HopperFwdSmall<D>>(p, stream);
}

// Backward: a CTA owns 64 keys per warpgroup. Two warpgroups (one set of dQ
// atomics for 128 keys) on full grids: D = 64 1.29x the mma.sync kernel at
// N = 4096, 1.26x at N = 1024 (one warpgroup 1.13x, 1.10x); D = 32 1.23x.
// D = 128 has one warpgroup and 2 CTAs per SM (its 128 registers of dK and dV a
// thread leave no room for the exchange of dQ partials): 1.42x. On grids under
// one wave, D = 64 runs one warpgroup, twice the CTAs: 1.55x at B*H = 5,
// N = 1000 (two warpgroups 1.24x).
template <int D>
using HopperBwdFull = wg::WgBwdConfig<D, (D > 64 ? 1 : 2), (D > 64 ? 2 : 1)>;
template <int D>
using HopperBwdSmall = std::conditional_t<D == 64, wg::WgBwdConfig<64, 1, 2>, HopperBwdFull<D>>;

template <class T, int D, class Cfg>
cudaError_t backward_with(const BwdParams& p, cudaStream_t stream) {
  return launch_backward<T, D>(p, &wg::attention_bwd_wgmma<T, D, Cfg>, Cfg::kN, Cfg::kThreads,
                               Cfg::template smem_bytes<T>(), stream);
}

template <class T, int D>
cudaError_t backward(const BwdParams& p, cudaStream_t stream) {
  if (std::is_same_v<HopperBwdFull<D>, HopperBwdSmall<D>> || fills_the_gpu(p.nk, HopperBwdFull<D>::kN, p.bh)) {
    return backward_with<T, D, HopperBwdFull<D>>(p, stream);
  }
  return backward_with<T, D, HopperBwdSmall<D>>(p, stream);
}

}  // namespace

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
