// fp32 attention on CUDA cores: the simple path (no tensor cores).
//
// One warp per row of the "streaming" side, 8 warps per CTA sharing 32-row
// tiles of the other side in shared memory. Within a tile lane j owns row j
// of the tile (a full D-long dot product against the warp's row, kept in
// shared memory), and the D columns of the outputs are split over the lanes
// (D / 32 each). Forward: online softmax per key tile (sgdm/attention_math.h).
// Backward in two passes without atomics: one warp per key row for dK, dV;
// one warp per query row for dQ; both recompute P from the saved lse.
#pragma once

#include "sgdm/attention_math.h"

namespace sgdm::cuda_attn {

constexpr int kSimtWarps = 8, kSimtTile = 32;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Copies rows [r0, r0 + 32) of an [n, D] matrix into smem (row stride D + 1,
// so lane j reading row j hits distinct banks); rows past n become zeros.
template <int D>
__device__ __forceinline__ void load_rows_f32(float* dst, const float* src, int r0, int n) {
  for (int i = static_cast<int>(threadIdx.x); i < kSimtTile * D; i += kSimtWarps * 32) {
    const int r = i / D, c = i % D;
    dst[r * (D + 1) + c] = r0 + r < n ? src[static_cast<int64_t>(r0 + r) * D + c] : 0.0f;
  }
}

template <int D>
__device__ __forceinline__ float dot_row(const float* x, const float* tile_row) {
  float s = 0.0f;
#pragma unroll 8
  for (int c = 0; c < D; ++c) s = fmaf(x[c], tile_row[c], s);
  return s;
}

// One query row per warp; out = softmax(scale q K^T) V.
template <int D>
__global__ void __launch_bounds__(256) attention_fwd_simt(const float* __restrict__ q, const float* __restrict__ k,
                                                          const float* __restrict__ v, float* __restrict__ out,
                                                          float* __restrict__ lse, int nq, int nk, float scale_log2) {
  constexpr int kVpt = D / 32;
  __shared__ float sk[kSimtTile * (D + 1)], sv[kSimtTile * (D + 1)], sq[kSimtWarps][D];
  const int64_t bh = blockIdx.y;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int r = static_cast<int>(blockIdx.x) * kSimtWarps + warp;
  const bool active = r < nq;
  for (int c = lane; c < D; c += 32) sq[warp][c] = active ? q[(bh * nq + r) * D + c] * scale_log2 : 0.0f;
  float acc[kVpt] = {};
  attn::OnlineRow row = attn::online_init();
  for (int j0 = 0; j0 < nk; j0 += kSimtTile) {
    __syncthreads();
    load_rows_f32<D>(sk, k + bh * nk * D, j0, nk);
    load_rows_f32<D>(sv, v + bh * nk * D, j0, nk);
    __syncthreads();
    const float s = j0 + lane < nk ? dot_row<D>(sq[warp], sk + lane * (D + 1)) : attn::neg_infinity();
    const float alpha = attn::online_rescale<attn::Base2Exp>(row, warp_max(s));
    const float p = exp2f(s - row.m);
    attn::online_add(row, warp_sum(p));
#pragma unroll
    for (int e = 0; e < kVpt; ++e) acc[e] *= alpha;
    for (int jj = 0; jj < kSimtTile; ++jj) {
      const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
      for (int e = 0; e < kVpt; ++e) acc[e] = fmaf(pj, sv[jj * (D + 1) + lane + 32 * e], acc[e]);
    }
  }
  if (!active) return;
  const float inv = attn::online_inv_sum(row);
#pragma unroll
  for (int e = 0; e < kVpt; ++e) out[(bh * nq + r) * D + lane + 32 * e] = acc[e] * inv;
  if (lane == 0) lse[bh * nq + r] = attn::online_lse<attn::Base2Exp>(row);
}

// Backward, key side: one key row per warp, dK = scale dS^T Q, dV = P^T dO.
template <int D>
__global__ void __launch_bounds__(256) attention_bwd_kv_simt(const float* __restrict__ q, const float* __restrict__ k,
                                                             const float* __restrict__ v, const float* __restrict__ dout,
                                                             const float* __restrict__ lse,
                                                             const float* __restrict__ delta, float* __restrict__ dk,
                                                             float* __restrict__ dv, int nq, int nk, float scale) {
  constexpr int kVpt = D / 32;
  constexpr float kLog2e = attn::Base2Exp::kFromNatural;
  __shared__ float sq[kSimtTile * (D + 1)], sdo[kSimtTile * (D + 1)], skr[kSimtWarps][D], svr[kSimtWarps][D];
  const int64_t bh = blockIdx.y;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int r = static_cast<int>(blockIdx.x) * kSimtWarps + warp;
  const bool active = r < nk;
  for (int c = lane; c < D; c += 32) {
    skr[warp][c] = active ? k[(bh * nk + r) * D + c] * (scale * kLog2e) : 0.0f;
    svr[warp][c] = active ? v[(bh * nk + r) * D + c] : 0.0f;
  }
  float dka[kVpt] = {}, dva[kVpt] = {};
  for (int i0 = 0; i0 < nq; i0 += kSimtTile) {
    __syncthreads();
    load_rows_f32<D>(sq, q + bh * nq * D, i0, nq);
    load_rows_f32<D>(sdo, dout + bh * nq * D, i0, nq);
    __syncthreads();
    const int i = i0 + lane;
    float p = 0.0f, ds = 0.0f;
    if (i < nq) {
      const float s = dot_row<D>(skr[warp], sq + lane * (D + 1));
      p = exp2f(s - attn::lse_in_domain<attn::Base2Exp>(lse[bh * nq + i]));
      ds = attn::score_grad(p, dot_row<D>(svr[warp], sdo + lane * (D + 1)), delta[bh * nq + i]);
    }
    for (int ii = 0; ii < kSimtTile; ++ii) {
      const float pi = __shfl_sync(0xffffffffu, p, ii), dsi = __shfl_sync(0xffffffffu, ds, ii);
#pragma unroll
      for (int e = 0; e < kVpt; ++e) {
        dva[e] = fmaf(pi, sdo[ii * (D + 1) + lane + 32 * e], dva[e]);
        dka[e] = fmaf(dsi, sq[ii * (D + 1) + lane + 32 * e], dka[e]);
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < kVpt; ++e) {
    dk[(bh * nk + r) * D + lane + 32 * e] = dka[e] * scale;
    dv[(bh * nk + r) * D + lane + 32 * e] = dva[e];
  }
}

// Backward, query side: one query row per warp, dQ = scale dS K (written, not accumulated).
template <int D>
__global__ void __launch_bounds__(256) attention_bwd_q_simt(const float* __restrict__ q, const float* __restrict__ k,
                                                            const float* __restrict__ v, const float* __restrict__ dout,
                                                            const float* __restrict__ lse,
                                                            const float* __restrict__ delta, float* __restrict__ dq,
                                                            int nq, int nk, float scale) {
  constexpr int kVpt = D / 32;
  constexpr float kLog2e = attn::Base2Exp::kFromNatural;
  __shared__ float sk[kSimtTile * (D + 1)], sv[kSimtTile * (D + 1)], sqr[kSimtWarps][D], sdor[kSimtWarps][D];
  const int64_t bh = blockIdx.y;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int r = static_cast<int>(blockIdx.x) * kSimtWarps + warp;
  const bool active = r < nq;
  for (int c = lane; c < D; c += 32) {
    sqr[warp][c] = active ? q[(bh * nq + r) * D + c] * (scale * kLog2e) : 0.0f;
    sdor[warp][c] = active ? dout[(bh * nq + r) * D + c] : 0.0f;
  }
  const float lse2 = active ? attn::lse_in_domain<attn::Base2Exp>(lse[bh * nq + r]) : 0.0f;
  const float dlt = active ? delta[bh * nq + r] : 0.0f;
  float acc[kVpt] = {};
  for (int j0 = 0; j0 < nk; j0 += kSimtTile) {
    __syncthreads();
    load_rows_f32<D>(sk, k + bh * nk * D, j0, nk);
    load_rows_f32<D>(sv, v + bh * nk * D, j0, nk);
    __syncthreads();
    float ds = 0.0f;
    if (j0 + lane < nk) {
      const float p = exp2f(dot_row<D>(sqr[warp], sk + lane * (D + 1)) - lse2);
      ds = attn::score_grad(p, dot_row<D>(sdor[warp], sv + lane * (D + 1)), dlt);
    }
    for (int jj = 0; jj < kSimtTile; ++jj) {
      const float dsj = __shfl_sync(0xffffffffu, ds, jj);
#pragma unroll
      for (int e = 0; e < kVpt; ++e) acc[e] = fmaf(dsj, sk[jj * (D + 1) + lane + 32 * e], acc[e]);
    }
  }
  if (!active) return;
  // The scale went into the query copy only; the tile is raw K, so dQ = scale dS K.
#pragma unroll
  for (int e = 0; e < kVpt; ++e) dq[(bh * nq + r) * D + lane + 32 * e] = acc[e] * scale;
}

}  // namespace sgdm::cuda_attn
