// Host side of the CUDA attention kernels: picks the kernel for (dtype, head
// dim) and launches it. Six tensor-core instantiations per direction
// ({fp16, bf16} x D in {32, 64, 128}) plus three fp32 SIMT ones keep the
// build small.
#include "attention_host.cuh"
#include "attention_simt.cuh"

namespace sgdm::cuda_attn {
namespace {

constexpr float kLog2e = attn::Base2Exp::kFromNatural;

// The dynamic shared memory one block of the current device may opt in to:
// 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86 / sm_89 (RTX 30xx / 40xx,
// A10, L4, L40), which run this build's sm_80 code.
cudaError_t max_smem_optin(int& bytes) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
}

// FwdTile's two groups taking turns at D = 128 take 170 KiB of shared memory,
// more than any GPU before Hopper offers a block; there one group runs alone
// (85 KiB; the configuration benchmarks/attention_tiles.cu checks against
// FwdTile).
template <int D>
using FwdTileOneGroup = FwdConfig<D, FwdTile<D>::kR, 1, 2>;

// The smallest opt-in limit this build runs on (sm_86 / sm_89: 99 KiB) holds
// every configuration that can be picked there.
constexpr int kSmallestSmemOptin = 99 * 1024;
static_assert(FwdTileOneGroup<128>::smem_bytes<__half>() <= kSmallestSmemOptin &&
                  FwdTile<64>::smem_bytes<__half>() <= kSmallestSmemOptin &&
                  FwdTile<32>::smem_bytes<__half>() <= kSmallestSmemOptin,
              "a forward tile that sm_86 / sm_89 cannot hold");
static_assert(BwdTile<128>::smem_bytes<__half>() <= kSmallestSmemOptin &&
                  BwdTile<64>::smem_bytes<__half>() <= kSmallestSmemOptin &&
                  BwdTile<32>::smem_bytes<__half>() <= kSmallestSmemOptin,
              "a backward tile that sm_86 / sm_89 cannot hold");

template <class T, int D, class Cfg>
cudaError_t forward_mma_with(const FwdParams& p, cudaStream_t stream) {
  return launch_forward<T>(p, &attention_fwd_mma<T, D, Cfg>, Cfg::kM, Cfg::kThreads, Cfg::template smem_bytes<T>(),
                           stream);
}

template <class T, int D>
cudaError_t forward_mma(const FwdParams& p, cudaStream_t stream) {
  using Cfg = FwdTile<D>;
  if constexpr (Cfg::kGroups == 2) {
    int optin = 0;
    const cudaError_t err = max_smem_optin(optin);
    if (err != cudaSuccess) return err;
    if (Cfg::template smem_bytes<T>() > optin) return forward_mma_with<T, D, FwdTileOneGroup<D>>(p, stream);
  }
  return forward_mma_with<T, D, Cfg>(p, stream);
}


template <class T, int D>
cudaError_t backward_mma(const BwdParams& p, cudaStream_t stream) {
  using Cfg = BwdTile<D>;
  return launch_backward<T, D>(p, &attention_bwd_mma<T, D>, Cfg::kN, Cfg::kThreads, Cfg::template smem_bytes<T>(),
                               stream);
}

template <int D>
cudaError_t forward_simt(const FwdParams& p, cudaStream_t stream) {
  attention_fwd_simt<D><<<grid(p.nq, kSimtWarps, p.bh), kSimtWarps * 32, 0, stream>>>(
      static_cast<const float*>(p.q), static_cast<const float*>(p.k), static_cast<const float*>(p.v),
      static_cast<float*>(p.out), p.lse, static_cast<int>(p.nq), static_cast<int>(p.nk), p.scale * kLog2e);
  return cudaGetLastError();
}

// fp32: dQ is written straight into dq (no atomics, no accumulator), already scaled.
template <int D>
cudaError_t backward_simt(const BwdParams& p, cudaStream_t stream) {
  cudaError_t err = launch_bwd_preprocess<float, D>(static_cast<const float*>(p.dout), static_cast<const float*>(p.out),
                                                    p.grad_lse, p.delta, nullptr, p.bh * p.nq, stream);  // delta only
  if (err != cudaSuccess) return err;
  const auto* q = static_cast<const float*>(p.q);
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  const auto* dout = static_cast<const float*>(p.dout);
  const int nq = static_cast<int>(p.nq), nk = static_cast<int>(p.nk);
  attention_bwd_kv_simt<D><<<grid(p.nk, kSimtWarps, p.bh), kSimtWarps * 32, 0, stream>>>(
      q, k, v, dout, p.lse, p.delta, static_cast<float*>(p.dk), static_cast<float*>(p.dv), nq, nk, p.scale);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attention_bwd_q_simt<D><<<grid(p.nq, kSimtWarps, p.bh), kSimtWarps * 32, 0, stream>>>(
      q, k, v, dout, p.lse, p.delta, static_cast<float*>(p.dq), nq, nk, p.scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const FwdParams& p, cudaStream_t stream) {
  return by_head_dim(p, [&](auto d) -> cudaError_t {
    constexpr int D = decltype(d)::value;
    switch (p.dtype) {
      case DType::kFloat16: return forward_mma<__half, D>(p, stream);
      case DType::kBFloat16: return forward_mma<__nv_bfloat16, D>(p, stream);
      case DType::kFloat32: return forward_simt<D>(p, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

cudaError_t attention_backward(const BwdParams& p, cudaStream_t stream) {
  return by_head_dim(p, [&](auto d) -> cudaError_t {
    constexpr int D = decltype(d)::value;
    switch (p.dtype) {
      case DType::kFloat16: return backward_mma<__half, D>(p, stream);
      case DType::kBFloat16: return backward_mma<__nv_bfloat16, D>(p, stream);
      case DType::kFloat32: return backward_simt<D>(p, stream);
      default: return cudaErrorInvalidValue;
    }
  });
}

}  // namespace sgdm::cuda_attn
