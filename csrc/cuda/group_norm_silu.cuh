// GroupNorm(+SiLU) forward and backward, CUDA kernels (torch-free; raw
// pointers). One block per (sample, group): the first pass over the group
// computes the statistics (per-thread shifted sums merged with the Welford /
// Chan formula of sgdm/welford.h), the second pass re-reads the group, which
// is still in L2, and writes the output, so HBM sees about one read and one
// write. SiLU and its derivative come from sgdm/silu.h, as on the CPU.
// Formulas: csrc/cpu/group_norm_silu_kernel.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "sgdm/group_norm_args.h"

namespace sgdm::cuda {

// Launch on `stream`; return the launch error (cudaSuccess when fine).
cudaError_t launch_group_norm_silu_fwd(const GroupNormFwdArgs& args, cudaStream_t stream);
cudaError_t launch_group_norm_silu_bwd(const GroupNormBwdArgs& args, cudaStream_t stream);

// Shared memory a block of the forward (backward) takes, static and dynamic:
// per-channel arrays of C/G values, so many channels per group can exceed
// what a device gives a block (the glue checks, to name the cause).
size_t group_norm_silu_smem_bytes(const GroupNormShape& s, bool backward);

}  // namespace sgdm::cuda

#ifdef __CUDACC__
#include "common.cuh"
#include "sgdm/silu.h"
#include "sgdm/welford.h"

namespace sgdm::cuda {

constexpr int kGnThreads = 512;
constexpr int kGnUnroll = 4;

// Element e (0 <= e < C/G * HW, 32-bit: the launcher checks) of one group:
// its memory offset and its channel within the group.
template <bool kCL>
struct GroupIndex {
  int64_t base;  // offset of the group's first element
  int64_t c;     // channels (the NHWC position stride)
  unsigned hw;
  unsigned cg;
  __device__ __forceinline__ int64_t offset(unsigned e) const {
    if constexpr (kCL) {
      const unsigned p = e / cg;
      return base + static_cast<int64_t>(p) * c + (e - p * cg);
    } else {
      return base + e;
    }
  }
  __device__ __forceinline__ unsigned channel(unsigned e) const {
    if constexpr (kCL) {
      return e % cg;
    } else {
      return e / hw;
    }
  }
};

template <bool kCL>
__device__ __forceinline__ GroupIndex<kCL> group_index(const GroupNormShape& s, int64_t n,
                                                      int64_t g) {
  const int64_t cg = s.c / s.groups;
  GroupIndex<kCL> idx;
  idx.base = kCL ? n * s.hw * s.c + g * cg : (n * s.c + g * cg) * s.hw;
  idx.c = s.c;
  idx.hw = static_cast<unsigned>(s.hw);
  idx.cg = static_cast<unsigned>(cg);
  return idx;
}

template <typename Acc>
__device__ __forceinline__ WelfordData<Acc> shfl_welford(WelfordData<Acc> w, int offset) {
  WelfordData<Acc> o;
  o.mean = __shfl_xor_sync(0xffffffffu, w.mean, offset);
  o.m2 = __shfl_xor_sync(0xffffffffu, w.m2, offset);
  o.count = __shfl_xor_sync(0xffffffffu, w.count, offset);
  return o;
}

// Merges every thread's partial; the result is valid in every thread.
template <typename Acc>
__device__ WelfordData<Acc> block_welford(WelfordData<Acc> w, WelfordData<Acc>* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) w = welford_merge(w, shfl_welford(w, o));
  if (lane == 0) scratch[warp] = w;
  __syncthreads();
  w = lane < warps ? scratch[lane] : WelfordData<Acc>{Acc(0), Acc(0), Acc(0)};
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) w = welford_merge(w, shfl_welford(w, o));
  return w;
}

// Register-cached forward: a thread keeps kGnCacheElems elements of its group
// (kGnCacheElems / kVec units) in registers between the two passes, so the
// second pass reads nothing, when the group fits (checked by the launcher;
// 16384 elements per group with 512 threads: GroupNorm(32) over 512 channels
// at 32x32 or 128 channels at 64x64). The streaming kernel re-reads the group
// from L2, where part of it has been evicted by the time hundreds of groups
// are in flight. Only for 16-byte units of 2-4 byte types: float64 or
// element-wise units (channels-last, unaligned) would need 90-100 registers
// and halve the blocks per SM.
constexpr int kGnCacheElems = 32;

template <typename T, int kVec>
constexpr int gn_cache_units() {
  return sizeof(T) == 8 || kVec == 1 ? 0 : kGnCacheElems / kVec;
}

// Dynamic shared memory: scale[C/G], shift[C/G]. The group is walked in
// units of kVec elements: kVec > 1 only for NCHW with H*W a multiple of kVec
// and 16-byte aligned tensors (the launcher checks), so a unit never crosses
// a channel and costs one channel division instead of kVec. kCached: the
// group stays in registers (see kGnCacheElems).
template <typename T, bool kCL, bool kSilu, int kVec, bool kCached>
__global__ void group_norm_silu_fwd_kernel(GroupNormFwdArgs a) {
  static_assert(kVec == 1 || !kCL, "vector units are for NCHW");
  using Acc = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  Acc* scale = reinterpret_cast<Acc*>(smem_raw);
  __shared__ WelfordData<Acc> scratch[kWarp];
  const int64_t n = blockIdx.x / a.s.groups, g = blockIdx.x % a.s.groups;
  const GroupIndex<kCL> idx = group_index<kCL>(a.s, n, g);
  Acc* shift = scale + idx.cg;
  const unsigned units = idx.cg * idx.hw / kVec;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  // Shifted sums keep the per-thread partials free of cancellation; Chan's
  // merge combines them exactly. k, the group's first element, is the
  // common shift; each thread's sums are shifted by its own first element kt
  // and its mean moved to k afterwards: sum(d^2) - sum(d)^2 / n cancels by a
  // factor 1 + (mean - shift)^2 / var, so with k alone one outlying first
  // element (a 30-sigma corner pixel) would cost every partial about 10 bits
  // (float32 simulation of this reduction, 16384 elements: variance error
  // 6.5e-6 relative with k, 3e-7 with kt). kt - k is exact for a nearly
  // constant group (Sterbenz), which keeps the large-mean case below exact.
  const Acc k = to_acc<Acc>(ldg(x + idx.base));
  const Acc kt = threadIdx.x < units ? to_acc<Acc>(ldg(x + idx.offset(threadIdx.x * kVec))) : k;
  Acc s1 = 0, s2 = 0, cnt = 0;
  const auto accumulate = [&](const Vec<T, kVec>& xv) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const Acc d = to_acc<Acc>(xv.v[i]) - kt;
      s1 += d;
      s2 += d * d;
    }
    cnt += Acc(kVec);
  };
  constexpr int kCache = gn_cache_units<T, kVec>();
  static_assert(!kCached || kCache > 0, "no register cache for this type");
  Vec<T, kVec> cache[kCached ? kCache : 1];
  if constexpr (kCached) {
#pragma unroll
    for (int u = 0; u < kCache; ++u) {
      const unsigned t = threadIdx.x + u * blockDim.x;
      if (t < units) cache[u] = load_vec<T, kVec>(x + idx.offset(t * kVec));
    }
#pragma unroll
    for (int u = 0; u < kCache; ++u) {
      if (threadIdx.x + u * blockDim.x < units) accumulate(cache[u]);
    }
  } else {
    for (unsigned start = threadIdx.x; start < units; start += kGnUnroll * blockDim.x) {
#pragma unroll
      for (int u = 0; u < kGnUnroll; ++u) {
        const unsigned t = start + u * blockDim.x;
        if (t < units) accumulate(load_vec<T, kVec>(x + idx.offset(t * kVec)));
      }
    }
  }
  // Every partial's mean is relative to the same k, so the partials merge as
  // means relative to k, and the output is normalised as (x - k) - mean_rel: x - k
  // is exact for x near the mean, while x - (k + mean_rel) would round the
  // mean to the input's grid first (an error of up to ulp(mean) / 2 times
  // rstd, 3e-3 for mean 1000 and std 0.01).
  WelfordData<Acc> w{Acc(0), Acc(0), cnt};
  if (cnt > Acc(0)) {
    w.mean = (kt - k) + s1 / cnt;
    w.m2 = s2 - s1 * s1 / cnt;
  }
  w = block_welford(w, scratch);
  const Acc rstd = Acc(1) / sqrt(welford_variance(w) + static_cast<Acc>(a.eps));
  if (threadIdx.x == 0) {
    static_cast<Acc*>(a.mean)[blockIdx.x] = k + w.mean;
    static_cast<Acc*>(a.rstd)[blockIdx.x] = rstd;
  }
  const Acc* wt = affine_row<Acc>(a.weight, a.weight_stride, n);
  const Acc* bs = affine_row<Acc>(a.bias, a.bias_stride, n);
  for (unsigned j = threadIdx.x; j < idx.cg; j += blockDim.x) {
    const int64_t c = g * idx.cg + j;
    // z = (x - mean) * scale + bias: exact for nearly constant groups (large rstd).
    scale[j] = rstd * (wt ? wt[c] : Acc(1));
    shift[j] = bs ? bs[c] : Acc(0);
  }
  __syncthreads();
  const auto write = [&](unsigned t, const Vec<T, kVec>& xv) {
    const int64_t off = idx.offset(t * kVec);
    const unsigned j = idx.channel(t * kVec);
    const Acc sc = scale[j], sh = shift[j];
    Vec<T, kVec> yv;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      Acc z = ((to_acc<Acc>(xv.v[i]) - k) - w.mean) * sc + sh;
      if constexpr (kSilu) z = silu_from_sigmoid(z, sigmoid(z));
      yv.v[i] = from_acc<T>(z);
    }
    store_vec<T, kVec>(y + off, yv);
  };
  if constexpr (kCached) {
#pragma unroll
    for (int u = 0; u < kCache; ++u) {
      const unsigned t = threadIdx.x + u * blockDim.x;
      if (t < units) write(t, cache[u]);
    }
  } else {
    for (unsigned start = threadIdx.x; start < units; start += kGnUnroll * blockDim.x) {
#pragma unroll
      for (int u = 0; u < kGnUnroll; ++u) {
        const unsigned t = start + u * blockDim.x;
        if (t < units) write(t, load_vec<T, kVec>(x + idx.offset(t * kVec)));
      }
    }
  }
}

// dL/dz at one element, and xhat there.
template <typename Acc, bool kSilu>
__device__ __forceinline__ Acc grad_z(Acc x, Acc dy, Acc mean, Acc rstd, Acc gamma, Acc beta, Acc& xhat) {
  xhat = (x - mean) * rstd;
  Acc dz = dy;
  if constexpr (kSilu) {
    const Acc z = xhat * gamma + beta;
    dz *= silu_grad_from_sigmoid(z, sigmoid(z));
  }
  return dz;
}

// Dynamic shared memory: gamma, beta, sum_dz, sum_dzx [C/G each]. Units of
// kVec elements as in the forward.
template <typename T, bool kCL, bool kSilu, int kVec>
__global__ void group_norm_silu_bwd_kernel(GroupNormBwdArgs a) {
  static_assert(kVec == 1 || !kCL, "vector units are for NCHW");
  using Acc = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ Acc scratch[kWarp];
  const int64_t n = blockIdx.x / a.s.groups, g = blockIdx.x % a.s.groups;
  const GroupIndex<kCL> idx = group_index<kCL>(a.s, n, g);
  Acc* gamma = reinterpret_cast<Acc*>(smem_raw);
  Acc *beta = gamma + idx.cg, *sdz = beta + idx.cg, *sdzx = sdz + idx.cg;
  const unsigned m = idx.cg * idx.hw, units = m / kVec;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.grad_y);
  const Acc mean = static_cast<const Acc*>(a.mean)[blockIdx.x];
  const Acc rstd = static_cast<const Acc*>(a.rstd)[blockIdx.x];
  const Acc* wt = affine_row<Acc>(a.weight, a.weight_stride, n);
  const Acc* bs = affine_row<Acc>(a.bias, a.bias_stride, n);
  for (unsigned j = threadIdx.x; j < idx.cg; j += blockDim.x) {
    const int64_t c = g * idx.cg + j;
    gamma[j] = wt ? wt[c] : Acc(1);
    beta[j] = bs ? bs[c] : Acc(0);
    sdz[j] = Acc(0);
    sdzx[j] = Acc(0);
  }
  __syncthreads();
  const auto unit_sums = [&](unsigned t, unsigned j, Acc& s1, Acc& s2) {
    const int64_t off = idx.offset(t * kVec);
    const Vec<T, kVec> xv = load_vec<T, kVec>(x + off), gv = load_vec<T, kVec>(dy + off);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      Acc xhat;
      const Acc dz = grad_z<Acc, kSilu>(to_acc<Acc>(xv.v[i]), to_acc<Acc>(gv.v[i]), mean, rstd, gamma[j],
                                        beta[j], xhat);
      s1 += dz;
      s2 += dz * xhat;
    }
  };
  if constexpr (kCL) {
    // Per-channel sums in NHWC: a thread keeps a running sum while its
    // channel stays the same (always, when blockDim is a multiple of C/G) and
    // flushes it to shared memory when it changes.
    unsigned cur = 0xffffffffu;
    Acc acc1 = 0, acc2 = 0;
    for (unsigned t = threadIdx.x; t < units; t += blockDim.x) {
      const unsigned j = idx.channel(t * kVec);
      if (j != cur) {
        if (cur != 0xffffffffu) {
          atomicAdd(sdz + cur, acc1);
          atomicAdd(sdzx + cur, acc2);
        }
        cur = j;
        acc1 = acc2 = Acc(0);
      }
      unit_sums(t, j, acc1, acc2);
    }
    if (cur != 0xffffffffu) {
      atomicAdd(sdz + cur, acc1);
      atomicAdd(sdzx + cur, acc2);
    }
  } else {
    // NCHW: a warp's consecutive units share a channel unless it straddles a
    // channel boundary. Then the warp sums first and one lane adds, instead
    // of 32 lanes contending for the same shared-memory word (a float
    // atomicAdd on shared memory is a compare-and-swap loop). The loop is
    // uniform over the block so every lane reaches the warp collectives.
    const int lane = threadIdx.x % kWarp;
    for (unsigned base = 0; base < units; base += blockDim.x) {
      const unsigned t = base + threadIdx.x;
      const bool active = t < units;
      if (!__shfl_sync(0xffffffffu, active, 0)) continue;  // lane 0 has the warp's lowest t
      const unsigned j = active ? idx.channel(t * kVec) : 0u;
      Acc a1 = 0, a2 = 0;
      if (active) unit_sums(t, j, a1, a2);
      const unsigned j0 = __shfl_sync(0xffffffffu, j, 0);
      if (__all_sync(0xffffffffu, !active || j == j0)) {
        a1 = warp_sum(a1);
        a2 = warp_sum(a2);
        if (lane == 0) {
          atomicAdd(sdz + j0, a1);
          atomicAdd(sdzx + j0, a2);
        }
      } else if (active) {
        atomicAdd(sdz + j, a1);
        atomicAdd(sdzx + j, a2);
      }
    }
  }
  __syncthreads();
  Acc pa = 0, pb = 0;  // sum(dz * w), sum(dz * w * xhat)
  for (unsigned j = threadIdx.x; j < idx.cg; j += blockDim.x) {
    pa += gamma[j] * sdz[j];
    pb += gamma[j] * sdzx[j];
  }
  const Acc sum_a = block_sum(pa, scratch);
  const Acc sum_b = block_sum(pb, scratch);
  const Acc inv_m = Acc(1) / static_cast<Acc>(m);
  const Acc c1 = -rstd * sum_a * inv_m, c2 = -rstd * sum_b * inv_m;
  T* dx = static_cast<T*>(a.grad_x);
  for (unsigned start = threadIdx.x; start < units; start += kGnUnroll * blockDim.x) {
#pragma unroll
    for (int u = 0; u < kGnUnroll; ++u) {
      const unsigned t = start + u * blockDim.x;
      if (t < units) {
        const int64_t off = idx.offset(t * kVec);
        const unsigned j = idx.channel(t * kVec);
        const Vec<T, kVec> xv = load_vec<T, kVec>(x + off), gv = load_vec<T, kVec>(dy + off);
        Vec<T, kVec> dv;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          Acc xhat;
          const Acc dz = grad_z<Acc, kSilu>(to_acc<Acc>(xv.v[i]), to_acc<Acc>(gv.v[i]), mean, rstd, gamma[j],
                                            beta[j], xhat);
          dv.v[i] = from_acc<T>(dz * gamma[j] * rstd + c1 + xhat * c2);
        }
        store_vec<T, kVec>(dx + off, dv);
      }
    }
  }
  if (a.sum_dz != nullptr) {
    const int64_t row = n * a.s.c + g * idx.cg;
    for (unsigned j = threadIdx.x; j < idx.cg; j += blockDim.x) {
      static_cast<Acc*>(a.sum_dz)[row + j] = sdz[j];
      static_cast<Acc*>(a.sum_dzx)[row + j] = sdzx[j];
    }
  }
}

}  // namespace sgdm::cuda
#endif  // __CUDACC__
