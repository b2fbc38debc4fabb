// FlashAttention-2 forward for fp16 / bf16 on tensor cores (Dao 2023, Alg. 1).
//
// One CTA = 4 warps = 64 kR query rows of one (batch, head); each warp owns
// 16 kR rows (kR = 2 for D <= 64) and streams 64-key blocks of K and V
// through shared memory, double buffered with cp.async. S = Q K^T and O += P V are m16n8k16 mma.sync with
// fp32 accumulators; the online softmax (sgdm/attention_math.h, base 2, the
// scores pre-multiplied by scale * log2(e)) runs in registers, each row's
// state replicated over the 4 lanes that hold it.
#pragma once

#include "attention_mma.cuh"
#include "sgdm/attention_math.h"

namespace sgdm::cuda_attn {

template <int D>
struct FwdTile {
  // Query rows per warp = 16 kR. Two row tiles per warp (D <= 64) reuse every
  // K and V fragment loaded from shared memory for two mma's, halving the
  // ldmatrix traffic per product (FA-2's 128-row blocks); D = 128 keeps one
  // so that the accumulators stay in registers.
  static constexpr int kR = D > 64 ? 1 : 2;
  static constexpr int kM = 64 * kR, kN = 64, kThreads = 128, kLd = D + 8;
  template <class T>
  static constexpr int smem_bytes() {
    return (kM + 4 * kN) * kLd * static_cast<int>(sizeof(T));  // Q, 2 x K, 2 x V
  }
};

template <class T, int D>
__global__ void __launch_bounds__(128) attention_fwd_mma(const T* __restrict__ q, const T* __restrict__ k,
                                                         const T* __restrict__ v, T* __restrict__ out,
                                                         float* __restrict__ lse, int nq, int nk,
                                                         float scale_log2) {
  using Cfg = FwdTile<D>;
  constexpr int kR = Cfg::kR, kM = Cfg::kM, kN = Cfg::kN, kLd = Cfg::kLd, kDt = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + kM * kLd;
  T* sv = sk + 2 * kN * kLd;

  const int64_t bh = blockIdx.y;
  const int m0 = static_cast<int>(blockIdx.x) * kM;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const T* qg = q + (bh * nq + m0) * D;
  const T* kg = k + bh * nk * D;
  const T* vg = v + bh * nk * D;
  const int n_blocks = (nk + kN - 1) / kN;

  load_tile_async<T, D, Cfg::kThreads>(sq, qg, D, kM, nq - m0);
  load_tile_async<T, D, Cfg::kThreads>(sk, kg, D, kN, nk);
  load_tile_async<T, D, Cfg::kThreads>(sv, vg, D, kN, nk);
  cp_async_commit();

  // Warp w owns query rows w * 16 kR .. w * 16 kR + 16 kR - 1 of the block.
  float acc[kR][kDt][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int i = 0; i < kDt; ++i) acc[r][i][0] = acc[r][i][1] = acc[r][i][2] = acc[r][i][3] = 0.0f;
  attn::OnlineRow row[kR][2];
#pragma unroll
  for (int r = 0; r < kR; ++r) row[r][0] = row[r][1] = attn::online_init();
  uint32_t qf[kR][D / 16][4];

  for (int j = 0; j < n_blocks; ++j) {
    if (j + 1 < n_blocks) {  // prefetch the next block into the other buffer
      const int64_t off = static_cast<int64_t>(j + 1) * kN * D;
      const int buf = (j + 1) & 1;
      load_tile_async<T, D, Cfg::kThreads>(sk + buf * kN * kLd, kg + off, D, kN, nk - (j + 1) * kN);
      load_tile_async<T, D, Cfg::kThreads>(sv + buf * kN * kLd, vg + off, D, kN, nk - (j + 1) * kN);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          ldmatrix_x4(qf[r][kk], sq + ((warp * kR + r) * 16 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
    }
    const T* kb = sk + (j & 1) * kN * kLd;
    const T* vb = sv + (j & 1) * kN * kLd;

    float s[kR][kN / 8][4];
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int i = 0; i < kN / 8; ++i) s[r][i][0] = s[r][i][1] = s[r][i][2] = s[r][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, kb + (np * 16 + lane % 8 + (lane / 16) * 8) * kLd + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          mma_16816<T>(s[r][2 * np], qf[r][kk], b[0], b[1]);
          mma_16816<T>(s[r][2 * np + 1], qf[r][kk], b[2], b[3]);
        }
      }
    }

    // Only the last block can hold keys past nk (block-uniform branch).
    const bool partial = (j + 1) * kN > nk;
    const int key0 = j * kN + 2 * (lane % 4);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // h = 0: row lane/4, h = 1: row lane/4 + 8
        float bmax = attn::neg_infinity();
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[r][nt][2 * h + e];
            x = (!partial || key0 + nt * 8 + e < nk) ? x * scale_log2 : attn::neg_infinity();
            bmax = fmaxf(bmax, x);
          }
        }
        const float alpha = attn::online_rescale<attn::Base2Exp>(row[r][h], quad_max(bmax));
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[r][nt][2 * h + e];
            x = exp2f(x - row[r][h].m);
            sum += x;
          }
        }
        attn::online_add(row[r][h], sum);  // this lane's share; the quad is summed at the end
#pragma unroll
        for (int dt = 0; dt < kDt; ++dt) {
          acc[r][dt][2 * h] *= alpha;
          acc[r][dt][2 * h + 1] *= alpha;
        }
      }
    }

#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
      uint32_t a[kR][4];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        a[r][0] = Half2<T>::pack(s[r][2 * kc][0], s[r][2 * kc][1]);
        a[r][1] = Half2<T>::pack(s[r][2 * kc][2], s[r][2 * kc][3]);
        a[r][2] = Half2<T>::pack(s[r][2 * kc + 1][0], s[r][2 * kc + 1][1]);
        a[r][3] = Half2<T>::pack(s[r][2 * kc + 1][2], s[r][2 * kc + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vb + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + dp * 16 + (lane / 16) * 8);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          mma_16816<T>(acc[r][2 * dp], a[r], b[0], b[1]);
          mma_16816<T>(acc[r][2 * dp + 1], a[r], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }

#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[r][h].l = quad_sum(row[r][h].l);
      const float inv = attn::online_inv_sum(row[r][h]);
      const int rr = m0 + (warp * kR + r) * 16 + lane / 4 + 8 * h;
      if (rr >= nq) continue;
      T* orow = out + (bh * nq + rr) * D + 2 * (lane % 4);
#pragma unroll
      for (int dt = 0; dt < kDt; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8) =
            Half2<T>::pack(acc[r][dt][2 * h] * inv, acc[r][dt][2 * h + 1] * inv);
      if (lane % 4 == 0) lse[bh * nq + rr] = attn::online_lse<attn::Base2Exp>(row[r][h]);
    }
  }
}

}  // namespace sgdm::cuda_attn
