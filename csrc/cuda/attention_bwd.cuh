// FlashAttention-2 backward for fp16 / bf16 on tensor cores (Dao 2023, Alg. 2).
//
// One CTA = 4 warps = 64 keys of one (batch, head), K and V resident in
// shared memory; it streams query blocks (Q, dO double buffered with
// cp.async). Each warp owns 16 keys and works transposed, so that dK and dV
// stay in its registers:
//   S^T = K Q^T,  P^T = exp2(S^T scale log2e - lse log2e),  dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T (dP^T - delta),  dK += dS^T Q.
// dS^T goes through shared memory so the warps can then split dQ += dS K by
// query rows, added with fp32 atomics to a [B*H, Nq, D] accumulator (the
// glue scales and casts it). No N x N tensor touches global memory.
#pragma once

#include "attention_mma.cuh"
#include "sgdm/attention_math.h"

namespace sgdm::cuda_attn {

template <int D>
struct BwdTile {
  static constexpr int kN = 64, kThreads = 128, kLd = D + 8;
  // Query rows per step: fewer for D = 128, whose dK and dV accumulators take
  // 128 registers (32 query rows spill a few bytes at 255 registers).
  static constexpr int kM = D > 64 ? 16 : 64;
  static constexpr int kLdS = kM + 8;
  template <class T>
  static constexpr int smem_bytes() {  // K, V, 2 x Q, 2 x dO, dS^T
    return ((2 * kN + 4 * kM) * kLd + kN * kLdS) * static_cast<int>(sizeof(T));
  }
};

// acc[16 x kCols] (+)= A[16 x 16*kK] B, A from registers, B[k][n] row-major in smem (ldmatrix.trans).
template <class T, int kCols>
__device__ __forceinline__ void mma_a_regs_b_rows(float (&acc)[kCols / 8][4], const uint32_t (&a)[4], const T* b,
                                                  int ld, int lane) {
#pragma unroll
  for (int dp = 0; dp < kCols / 16; ++dp) {
    uint32_t r[4];
    ldmatrix_x4_trans(r, b + (lane % 8 + ((lane / 8) % 2) * 8) * ld + dp * 16 + (lane / 16) * 8);
    mma_16816<T>(acc[2 * dp], a, r[0], r[1]);
    mma_16816<T>(acc[2 * dp + 1], a, r[2], r[3]);
  }
}

// acc[16 x kRows] = A B^T for A = 16 rows of `a` (smem) and B = kRows rows of `b`
// (smem), both [rows][D]: the transposed score products S^T = K Q^T, dP^T = V dO^T.
template <class T, int D, int kRows>
__device__ __forceinline__ void mma_rows_rows(float (&acc)[kRows / 8][4], const T* a, const T* b, int lane) {
  constexpr int kLd = D + 8;
#pragma unroll
  for (int i = 0; i < kRows / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, a + (lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int np = 0; np < kRows / 16; ++np) {
      uint32_t r[4];
      ldmatrix_x4(r, b + (np * 16 + lane % 8 + (lane / 16) * 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
      mma_16816<T>(acc[2 * np], af, r[0], r[1]);
      mma_16816<T>(acc[2 * np + 1], af, r[2], r[3]);
    }
  }
}

// Two adjacent accumulator tiles (columns 16 kc .. 16 kc + 15) as one A fragment.
template <class T, int kTiles>
__device__ __forceinline__ void to_a_fragment(uint32_t (&a)[4], const float (&c)[kTiles][4], int kc) {
  a[0] = Half2<T>::pack(c[2 * kc][0], c[2 * kc][1]);
  a[1] = Half2<T>::pack(c[2 * kc][2], c[2 * kc][3]);
  a[2] = Half2<T>::pack(c[2 * kc + 1][0], c[2 * kc + 1][1]);
  a[3] = Half2<T>::pack(c[2 * kc + 1][2], c[2 * kc + 1][3]);
}

// dQ rows of this step: dQ[kM x D] += dS[kM x kN] K[kN x D], dS read from its
// transposed copy in smem; warps split rows (and columns when kM < 64).
template <class T, int D>
__device__ __forceinline__ void accumulate_dq(float* dq, const T* sds, const T* sk, int m0, int nq, int warp,
                                              int lane) {
  using Cfg = BwdTile<D>;
  constexpr int kRowTiles = Cfg::kM / 16, kColSplit = 4 / kRowTiles, kCols = D / kColSplit;
  const int rt = warp % kRowTiles, c0 = (warp / kRowTiles) * kCols;
#pragma unroll
  for (int dp = 0; dp < kCols / 16; ++dp) {
    float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kc = 0; kc < Cfg::kN / 16; ++kc) {
      uint32_t a[4], b[4];
      ldmatrix_x4_trans(a, sds + (kc * 16 + lane % 8 + (lane / 16) * 8) * Cfg::kLdS + rt * 16 + ((lane / 8) % 2) * 8);
      ldmatrix_x4_trans(b, sk + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * Cfg::kLd + c0 + dp * 16 + (lane / 16) * 8);
      mma_16816<T>(c[0], a, b[0], b[1]);
      mma_16816<T>(c[1], a, b[2], b[3]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m0 + rt * 16 + lane / 4 + 8 * h;
      if (r >= nq) continue;
      float* dst = dq + static_cast<int64_t>(r) * D + c0 + dp * 16 + 2 * (lane % 4);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        atomicAdd(dst + t * 8, c[t][2 * h]);
        atomicAdd(dst + t * 8 + 1, c[t][2 * h + 1]);
      }
    }
  }
}

template <class T, int D>
__global__ void __launch_bounds__(128) attention_bwd_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                         const T* __restrict__ v, const T* __restrict__ dout,
                                                         const float* __restrict__ lse,
                                                         const float* __restrict__ delta, float* dq_accum,
                                                         T* __restrict__ dk, T* __restrict__ dv, int nq, int nk,
                                                         float scale) {
  using Cfg = BwdTile<D>;
  constexpr int kM = Cfg::kM, kN = Cfg::kN, kLd = Cfg::kLd, kDt = D / 8;
  constexpr float kLog2e = attn::Base2Exp::kFromNatural;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + kN * kLd;
  T* sq = sv + kN * kLd;      // 2 buffers
  T* sdo = sq + 2 * kM * kLd;  // 2 buffers
  T* sds = sdo + 2 * kM * kLd;

  const int64_t bh = blockIdx.y;
  const int n0 = static_cast<int>(blockIdx.x) * kN;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const T* qg = q + bh * nq * D;
  const T* dog = dout + bh * nq * D;
  const float* lse_bh = lse + bh * nq;
  const float* delta_bh = delta + bh * nq;
  const int m_blocks = (nq + kM - 1) / kM;

  load_tile_async<T, D, Cfg::kThreads>(sk, k + (bh * nk + n0) * D, D, kN, nk - n0);
  load_tile_async<T, D, Cfg::kThreads>(sv, v + (bh * nk + n0) * D, D, kN, nk - n0);
  load_tile_async<T, D, Cfg::kThreads>(sq, qg, D, kM, nq);
  load_tile_async<T, D, Cfg::kThreads>(sdo, dog, D, kM, nq);
  cp_async_commit();

  float dkacc[kDt][4], dvacc[kDt][4];
#pragma unroll
  for (int i = 0; i < kDt; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dkacc[i][e] = dvacc[i][e] = 0.0f;
  const int key_row = n0 + warp * 16 + lane / 4;  // + 8 for accumulator entries 2, 3

  for (int i = 0; i < m_blocks; ++i) {
    const int m0 = i * kM;
    if (i + 1 < m_blocks) {
      const int buf = (i + 1) & 1;
      const int64_t off = static_cast<int64_t>(m0 + kM) * D;
      load_tile_async<T, D, Cfg::kThreads>(sq + buf * kM * kLd, qg + off, D, kM, nq - m0 - kM);
      load_tile_async<T, D, Cfg::kThreads>(sdo + buf * kM * kLd, dog + off, D, kM, nq - m0 - kM);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* qb = sq + (i & 1) * kM * kLd;
    const T* dob = sdo + (i & 1) * kM * kLd;

    float p[kM / 8][4];
    mma_rows_rows<T, D, kM>(p, sk + warp * 16 * kLd, qb, lane);  // S^T
#pragma unroll
    for (int qt = 0; qt < kM / 8; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = m0 + qt * 8 + 2 * (lane % 4) + (e & 1);
        const bool valid = col < nq && key_row + 8 * (e / 2) < nk;
        p[qt][e] = valid ? exp2f(p[qt][e] * (scale * kLog2e) - attn::lse_in_domain<attn::Base2Exp>(lse_bh[col])) : 0.0f;
      }
    }
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) {  // dV += P^T dO
      uint32_t a[4];
      to_a_fragment<T, kM / 8>(a, p, kc);
      mma_a_regs_b_rows<T, D>(dvacc, a, dob + kc * 16 * kLd, kLd, lane);
    }
    float ds[kM / 8][4];
    mma_rows_rows<T, D, kM>(ds, sv + warp * 16 * kLd, dob, lane);  // dP^T
#pragma unroll
    for (int qt = 0; qt < kM / 8; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = m0 + qt * 8 + 2 * (lane % 4) + (e & 1);
        ds[qt][e] = attn::score_grad(p[qt][e], ds[qt][e], col < nq ? delta_bh[col] : 0.0f);
      }
    }
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) {  // dK += dS^T Q
      uint32_t a[4];
      to_a_fragment<T, kM / 8>(a, ds, kc);
      mma_a_regs_b_rows<T, D>(dkacc, a, qb + kc * 16 * kLd, kLd, lane);
    }
#pragma unroll
    for (int qt = 0; qt < kM / 8; ++qt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        T* dst = sds + (warp * 16 + lane / 4 + 8 * h) * Cfg::kLdS + qt * 8 + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(dst) = Half2<T>::pack(ds[qt][2 * h], ds[qt][2 * h + 1]);
      }
    }
    __syncthreads();
    accumulate_dq<T, D>(dq_accum + bh * nq * D, sds, sk, m0, nq, warp, lane);
    __syncthreads();  // sds and this step's Q / dO buffers are rewritten next step
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = key_row + 8 * h;
    if (r >= nk) continue;
    const int64_t row_off = (bh * nk + r) * D + 2 * (lane % 4);
#pragma unroll
    for (int dt = 0; dt < kDt; ++dt) {
      *reinterpret_cast<uint32_t*>(dk + row_off + dt * 8) =
          Half2<T>::pack(dkacc[dt][2 * h] * scale, dkacc[dt][2 * h + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv + row_off + dt * 8) = Half2<T>::pack(dvacc[dt][2 * h], dvacc[dt][2 * h + 1]);
    }
  }
}

}  // namespace sgdm::cuda_attn
