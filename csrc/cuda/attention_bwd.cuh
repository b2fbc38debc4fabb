// FlashAttention-2 backward for fp16 / bf16 on tensor cores (Dao 2023, Alg. 2).
//
// One CTA = kWarps warps = 16 kWarps keys of one (batch, head), K and V
// resident in shared memory; it streams query blocks (Q, dO and the rows'
// lse and delta double buffered with cp.async). Each warp owns 16 keys and
// works transposed, so that dK and dV stay in its registers:
//   S^T = K Q^T,  P^T = exp2(S^T scale log2e - lse log2e),  dV += P^T dO,
//   dP^T = V dO^T, dS^T = P^T (dP^T - delta),  dK += dS^T Q.
// dS^T goes through shared memory so the warps can then split dQ += dS K by
// query rows, added with fp32 atomics to a [B*H, Nq, D] accumulator (zeroed
// by attention_bwd_preprocess, scaled and cast by attention_dq_convert). No N x N tensor touches global memory.
#pragma once

#include "attention_mma.cuh"
#include "sgdm/attention_math.h"

namespace sgdm::cuda_attn {

template <int D>
struct BwdTile {
  // One warp per 16 keys. D <= 64: 8 warps and 128 keys per CTA, which halves
  // the dQ atomics (one set per key block) against 64-key blocks; D = 128: 4
  // warps, since each warp's dK and dV accumulators already take 128 registers.
  static constexpr int kWarps = D > 64 ? 4 : 8;
  static constexpr int kN = 16 * kWarps, kThreads = 32 * kWarps, kLd = D + 8;
  // Query rows per step: fewer for D = 128 (32 query rows spill a few bytes
  // at 255 registers).
  static constexpr int kM = D > 64 ? 16 : 64;
  static constexpr int kLdS = kM + 8;
  // D <= 64: each warp keeps its 16 keys' K and V as mma A fragments in
  // registers (2 x 4 D / 16), instead of reading them from shared memory at
  // every query step (shared memory bandwidth bounds this kernel).
  static constexpr bool kKVInRegs = D <= 64;
  template <class T>
  static constexpr int smem_bytes() {  // K, V, 2 x Q, 2 x dO, dS^T, then 2 x (lse, delta)
    return ((2 * kN + 4 * kM) * kLd + kN * kLdS) * static_cast<int>(sizeof(T)) +
           4 * kM * static_cast<int>(sizeof(float));
  }
};

#if !defined(SGDM_HOST_EMULATION)  // replaced on the host (tests/ops/cuda_host/wgmma_emulation.h)
// 4-byte async copy (row statistics); src_bytes = 0 writes zero.
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

// fp32 accumulation into global memory: two adjacent floats in one vector
// reduction on sm_90 (atomicAdd on float2), two scalar ones before.
__device__ __forceinline__ void atomic_add2(float* dst, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(x, y));
#else
  atomicAdd(dst, x);
  atomicAdd(dst + 1, y);
#endif
}
#endif  // !SGDM_HOST_EMULATION

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

// The A fragments of 16 rows of `a` ([rows][D] in smem), for k = 16 kk .. 16 kk + 15.
template <int D, class T>
__device__ __forceinline__ void load_a_fragment(uint32_t (&af)[4], const T* a, int kk, int lane) {
  ldmatrix_x4(af, a + (lane % 16) * (D + 8) + kk * 16 + (lane / 16) * 8);
}

// acc[16 x kRows] = A B^T for A = 16 rows of `a` (smem; or, with kAFrags, their
// fragments in af) and B = kRows rows of `b` (smem), both [rows][D]: the
// transposed score products S^T = K Q^T, dP^T = V dO^T.
template <class T, int D, int kRows, bool kAFrags>
__device__ __forceinline__ void mma_rows_rows(float (&acc)[kRows / 8][4], const T* a,
                                              const uint32_t (&af_regs)[D / 16][4], const T* b, int lane) {
  constexpr int kLd = D + 8;
#pragma unroll
  for (int i = 0; i < kRows / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    if constexpr (kAFrags) {
#pragma unroll
      for (int i = 0; i < 4; ++i) af[i] = af_regs[kk][i];
    } else {
      load_a_fragment<D>(af, a, kk, lane);
    }
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
  constexpr int kRowTiles = Cfg::kM / 16, kColSplit = Cfg::kWarps / kRowTiles, kCols = D / kColSplit;
  static_assert(kColSplit * kRowTiles == Cfg::kWarps && kCols % 16 == 0, "dQ split");
  constexpr int kDp = kCols / 16;
  const int rt = warp % kRowTiles, c0 = (warp / kRowTiles) * kCols;
  float c[kDp][2][4];
#pragma unroll
  for (int dp = 0; dp < kDp; ++dp)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[dp][0][e] = c[dp][1][e] = 0.0f;
#pragma unroll
  for (int kc = 0; kc < Cfg::kN / 16; ++kc) {  // each dS fragment feeds all of the warp's columns
    uint32_t a[4];
    ldmatrix_x4_trans(a, sds + (kc * 16 + lane % 8 + (lane / 16) * 8) * Cfg::kLdS + rt * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
    for (int dp = 0; dp < kDp; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sk + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * Cfg::kLd + c0 + dp * 16 + (lane / 16) * 8);
      mma_16816<T>(c[dp][0], a, b[0], b[1]);
      mma_16816<T>(c[dp][1], a, b[2], b[3]);
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = m0 + rt * 16 + lane / 4 + 8 * h;
    if (r >= nq) continue;
    float* dst = dq + static_cast<int64_t>(r) * D + c0 + 2 * (lane % 4);
#pragma unroll
    for (int dp = 0; dp < kDp; ++dp)
#pragma unroll
      for (int t = 0; t < 2; ++t) atomic_add2(dst + dp * 16 + t * 8, c[dp][t][2 * h], c[dp][t][2 * h + 1]);
  }
}

// The epilogue: dK = scale (dS^T Q) and dV = P^T dO of a warp's accumulator
// tiles (rows key_row and key_row + 8 of a (batch, head)), as T; keys past nk are not written.
template <class T, int kDt>
__device__ __forceinline__ void store_dkv(const float (&dkacc)[kDt][4], const float (&dvacc)[kDt][4], T* dk, T* dv,
                                          int64_t bh, int nk, int key_row, int lane, float scale) {
  constexpr int D = kDt * 8;
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

template <class T, int D>
__global__ void __launch_bounds__(BwdTile<D>::kThreads)
    attention_bwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                      float* dq_accum, T* __restrict__ dk, T* __restrict__ dv, int nq, int nk, float scale) {
  using Cfg = BwdTile<D>;
  constexpr int kM = Cfg::kM, kN = Cfg::kN, kLd = Cfg::kLd, kDt = D / 8;
  constexpr float kLog2e = attn::Base2Exp::kFromNatural;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + kN * kLd;
  T* sq = sv + kN * kLd;      // 2 buffers
  T* sdo = sq + 2 * kM * kLd;  // 2 buffers
  T* sds = sdo + 2 * kM * kLd;
  float* sstat = reinterpret_cast<float*>(sds + kN * Cfg::kLdS);  // [2][lse kM | delta kM]
  static_assert(((2 * kN + 4 * kM) * kLd + kN * Cfg::kLdS) * sizeof(T) % 8 == 0, "lse, delta read as float2");

  const int64_t bh = blockIdx.y;
  const int n0 = static_cast<int>(blockIdx.x) * kN;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const T* qg = q + bh * nq * D;
  const T* dog = dout + bh * nq * D;
  const float* lse_bh = lse + bh * nq;
  const float* delta_bh = delta + bh * nq;
  const int m_blocks = (nq + kM - 1) / kM;

  load_tile_async<T, D, Cfg::kThreads>(sk, k + (bh * nk + n0) * D, D, kN, nk - n0, tid);
  load_tile_async<T, D, Cfg::kThreads>(sv, v + (bh * nk + n0) * D, D, kN, nk - n0, tid);
  // Q, dO and the rows' lse (natural log) and delta for query block i into buffer i % 2.
  auto load_query_block = [&](int i) {
    const int m0 = i * kM, buf = i & 1;
    const int64_t off = static_cast<int64_t>(m0) * D;
    load_tile_async<T, D, Cfg::kThreads>(sq + buf * kM * kLd, qg + off, D, kM, nq - m0, tid);
    load_tile_async<T, D, Cfg::kThreads>(sdo + buf * kM * kLd, dog + off, D, kM, nq - m0, tid);
    for (int t = static_cast<int>(threadIdx.x); t < 2 * kM; t += Cfg::kThreads) {
      const int r = t % kM;
      const bool valid = m0 + r < nq;
      const float* src = (t < kM ? lse_bh : delta_bh) + (valid ? m0 + r : 0);
      cp_async_4(sstat + buf * 2 * kM + t, src, valid);
    }
  };
  load_query_block(0);
  cp_async_commit();

  float dkacc[kDt][4], dvacc[kDt][4];
#pragma unroll
  for (int i = 0; i < kDt; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dkacc[i][e] = dvacc[i][e] = 0.0f;
  const int key_row = n0 + warp * 16 + lane / 4;  // + 8 for accumulator entries 2, 3
  // Only the last key block can hold keys past nk (CTA-uniform). Their rows of
  // K are zeros, so their scores would be exp2(-lse), which can overflow:
  // they are masked to 0. Query rows past nq need no mask: their dO and delta
  // are zeros, so their P^T dO and dS^T vanish.
  const bool key_edge = n0 + kN > nk;
  const T* kw = sk + warp * 16 * kLd;  // this warp's 16 keys
  const T* vw = sv + warp * 16 * kLd;
  uint32_t kf[D / 16][4], vf[D / 16][4];  // their A fragments (kKVInRegs)

  for (int i = 0; i < m_blocks; ++i) {
    const int m0 = i * kM;
    if (i + 1 < m_blocks) load_query_block(i + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* qb = sq + (i & 1) * kM * kLd;
    const T* dob = sdo + (i & 1) * kM * kLd;
    const float* slse = sstat + (i & 1) * 2 * kM;  // this block's lse, then delta
    if constexpr (Cfg::kKVInRegs) {
      if (i == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          load_a_fragment<D>(kf[kk], kw, kk, lane);
          load_a_fragment<D>(vf[kk], vw, kk, lane);
        }
      }
    }

    float p[kM / 8][4];
    mma_rows_rows<T, D, kM, Cfg::kKVInRegs>(p, kw, kf, qb, lane);  // S^T
#pragma unroll
    for (int qt = 0; qt < kM / 8; ++qt) {
      // the lse of this lane's two query columns, in the base-2 domain
      const float2 l2 = *reinterpret_cast<const float2*>(slse + qt * 8 + 2 * (lane % 4));
      const float lse2[2] = {attn::lse_in_domain<attn::Base2Exp>(l2.x), attn::lse_in_domain<attn::Base2Exp>(l2.y)};
#pragma unroll
      for (int e = 0; e < 4; ++e) p[qt][e] = exp2f(fmaf(p[qt][e], scale * kLog2e, -lse2[e & 1]));
    }
    if (key_edge) {
#pragma unroll
      for (int qt = 0; qt < kM / 8; ++qt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key_row + 8 * (e / 2) >= nk) p[qt][e] = 0.0f;
    }
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) {  // dV += P^T dO
      uint32_t a[4];
      to_a_fragment<T, kM / 8>(a, p, kc);
      mma_a_regs_b_rows<T, D>(dvacc, a, dob + kc * 16 * kLd, kLd, lane);
    }
    float ds[kM / 8][4];
    mma_rows_rows<T, D, kM, Cfg::kKVInRegs>(ds, vw, vf, dob, lane);  // dP^T
#pragma unroll
    for (int qt = 0; qt < kM / 8; ++qt) {
      const float2 d2 = *reinterpret_cast<const float2*>(slse + kM + qt * 8 + 2 * (lane % 4));  // 0 past nq
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[qt][e] = attn::score_grad(p[qt][e], ds[qt][e], e & 1 ? d2.y : d2.x);
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

  store_dkv<T>(dkacc, dvacc, dk, dv, bh, nk, key_row, lane, scale);
}

// The backward's row preprocessing (FA-2's dot(dO, O) pass): delta_i =
// sum_d dO[i, d] O[i, d] - dL/dlse_i in fp32, one 16-byte vector per thread,
// D / kVec threads per row reduced with shuffles; zeroes the row of the fp32
// dQ accumulator when there is one.
__device__ __forceinline__ float element_to_float(float x) { return x; }
__device__ __forceinline__ float element_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float element_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T, int D>
__global__ void __launch_bounds__(256)
    attention_bwd_preprocess(const T* __restrict__ dout, const T* __restrict__ out,
                             const float* __restrict__ grad_lse, float* __restrict__ delta,
                             float* __restrict__ dq_accum, int64_t rows) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T)), kLanes = D / kVec;
  static_assert(kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "row lanes");
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = t / kLanes;
  const int c = static_cast<int>(t % kLanes) * kVec;
  float sum = 0.0f;
  if (row < rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(dout + row * D + c);
    const uint4 b = *reinterpret_cast<const uint4*>(out + row * D + c);
    const T* ea = reinterpret_cast<const T*>(&a);
    const T* eb = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum += element_to_float(ea[e]) * element_to_float(eb[e]);
    if (dq_accum != nullptr) {
#pragma unroll
      for (int e = 0; e < kVec; e += 4)
        *reinterpret_cast<float4*>(dq_accum + row * D + c + e) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (row < rows && c == 0) delta[row] = sum - (grad_lse != nullptr ? grad_lse[row] : 0.0f);
}

// dQ = scale * accumulator, cast to T: four elements per thread.
template <class T>
__global__ void __launch_bounds__(256)
    attention_dq_convert(const float* __restrict__ acc, T* __restrict__ dq, float scale, int64_t n4) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  const float4 a = reinterpret_cast<const float4*>(acc)[i];
  uint2 packed;
  packed.x = Half2<T>::pack(a.x * scale, a.y * scale);
  packed.y = Half2<T>::pack(a.z * scale, a.w * scale);
  reinterpret_cast<uint2*>(dq)[i] = packed;
}

}  // namespace sgdm::cuda_attn
