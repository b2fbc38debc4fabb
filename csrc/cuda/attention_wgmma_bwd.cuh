// Hopper (sm_90a) backward of flash attention on warpgroup MMAs: the
// production mma.sync backward (attention_bwd.cuh) moved to wgmma, with the
// same contract (attention_bwd_preprocess before, attention_dq_convert after).
//
// STATUS: first run on an H200 on 2026-11-28: it agreed with the mma.sync
// backward in benchmarks/attention_wgmma.cu (1.29x its speed at D = 64,
// N = 4096), and the op tests passed with it. Without a GPU,
// tests/ops/test_attention_ab_programs.py
// compiles it for sm_90a (no stack frame, no serialized wgmma), checks every
// operand descriptor on the CPU (tests/ops/cuda_host/wgmma_layouts.cu) and
// runs it in the CPU emulation of its PTX (wgmma_emulator.cpp) against
// float64 gradients; benchmarks/attention_wgmma.cu checks it against the
// production backward on an H100 / H200 and times both.
//
// Why: the mma.sync backward is what keeps forward+backward at 0.51x cuDNN on
// an H200 (bf16, D = 64, N = 4096). It reads every operand through ldmatrix;
// here the score products read K, V, Q and dO straight from shared memory,
// and one instruction covers 64 keys.
//
// Layout. A CTA holds kWG warpgroups; warpgroup w owns keys n0 + 64 w ..
// n0 + 64 w + 63, whose K and V stay in shared memory and whose dK and dV
// stay in its registers. It streams blocks of kM = 64 query rows (Q, dO and
// the rows' lse and delta, double buffered with cp.async). Per block, in
// each warpgroup, transposed as in the mma.sync kernel:
//   S^T = K_w Q^T and dP^T = V_w dO^T   m64n64k16, both operands K-major in smem
//   P^T = exp2(S^T scale log2e - lse), dS^T = P^T (dP^T - delta)   in registers
//   dV += P^T dO and dK += dS^T Q        m64nDk16, A from registers, B N-major
//   dQ_w = dS_w K_w                      m64nDk16, A = dS^T in smem read M-major,
//                                        B = K_w N-major: this warpgroup's keys only
// The warpgroups then sum their dQ partials in shared memory, each owning
// every kWG-th column tile, and add the sum to the fp32 dQ accumulator with
// one vector atomic per pair of elements: as many atomics as one warpgroup's.
#pragma once

#include "attention_bwd.cuh"
#include "attention_wgmma.cuh"

namespace sgdm::cuda_attn::wg {

// kWG warpgroups (64 keys each) per CTA, kMinBlocks CTAs per SM.
template <int D, int kWG_, int kMinBlocks_ = 1>
struct WgBwdConfig {
  static constexpr int kWG = kWG_, kMinBlocks = kMinBlocks_;
  static constexpr int kN = 64 * kWG, kM = 64, kThreads = 128 * kWG;
  // D = 128: dK and dV take 128 registers a thread. S^T and dP^T then run
  // one after the other, S^T turned into P^T's 16-bit fragments before dP^T
  // exists, and dQ = dS K starts only once dV += P^T dO and dK += dS^T Q are
  // done (their fragments then free), so that no more is live at once.
  static constexpr bool kRegisterLean = D > 64;
  // dQ in parts of D / kDqParts columns (one 64-column chunk of the K tile at D = 128).
  static constexpr int kDqParts = D > 64 ? D / 64 : 1;
  // dQ partials handed over: kWG - 1 per column tile of 8, a float4 per thread.
  static constexpr int kXchgFloats = (D / 8) * (kWG - 1) * 128 * 4;
  template <class T>
  static constexpr int smem_bytes() {  // K, V, 2 x Q, 2 x dO, dS^T per warpgroup, exchange, 2 x (lse, delta)
    return ((2 * kN + 4 * kM) * D + kWG * 64 * kM) * static_cast<int>(sizeof(T)) +
           (kXchgFloats + 4 * kM) * static_cast<int>(sizeof(float)) + 1024;
  }
};

// The backward's wgmma operands as descriptors, from the shared-memory byte
// addresses of its tiles (K, V: kN rows; Q, dO: kM rows; each in the layout
// of Swizzle<D>; a warpgroup's dS^T: [64 keys][kM queries] in the layout of
// Swizzle<kM>). tests/ops/cuda_host/wgmma_layouts.cu checks them as it checks
// the forward's.
template <int D, int kN, int kM>
struct BwdOperandDescs {
  // A of S^T = K_w Q^T and dP^T = V_w dO^T: keys 64 wg .. 64 wg + 63 of a K or V tile,
  // head-dim columns 16 kk .. 16 kk + 15.
  static __host__ __device__ __forceinline__ uint64_t keys(uint32_t tile, int wg, int kk) {
    return OperandDescs<D, kN, kM>::q(tile, wg, kk);
  }
  // B of the same: all kM query rows of a Q or dO tile, head-dim columns 16 kk .. 16 kk + 15.
  static __host__ __device__ __forceinline__ uint64_t queries(uint32_t tile, int kk) {
    return OperandDescs<D, kN, kM>::k(tile, kk);
  }
  // B of dV += P^T dO and dK += dS^T Q: query rows 16 kc .. 16 kc + 15 of a dO or Q tile, all D columns.
  static __host__ __device__ __forceinline__ uint64_t queries_n(uint32_t tile, int kc) {
    return OperandDescs<D, kN, kM>::v(tile, kc);
  }
  // A of dQ_w = dS_w K_w, M-major: keys 16 kc .. 16 kc + 15 of a warpgroup's dS^T tile, all kM queries.
  static __host__ __device__ __forceinline__ uint64_t ds(uint32_t tile, int kc) {
    return OperandDescs<kM, 64, 64>::v(tile, kc);
  }
  // B of the same: keys 64 wg + 16 kc .. 64 wg + 16 kc + 15 of the K tile, all D columns
  // from column 64 chunk on (chunk > 0: a product of 64 columns, one swizzle chunk).
  static __host__ __device__ __forceinline__ uint64_t keys_n(uint32_t tile, int wg, int kc, int chunk) {
    return OperandDescs<D, kM, kN>::v(tile + static_cast<uint32_t>(chunk * kN * Swizzle<D>::kBytes), 4 * wg + kc);
  }
};

// The body of attention_bwd_wgmma (below).
template <class T, int D, class Cfg>
__device__ __forceinline__ void bwd_wgmma_cta(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, const T* __restrict__ dout,
                                              const float* __restrict__ lse, const float* __restrict__ delta,
                                              float* dq_accum, T* __restrict__ dk, T* __restrict__ dv, int nq,
                                              int nk, float scale) {
  constexpr int kN = Cfg::kN, kM = Cfg::kM, kWG = Cfg::kWG, kDT = D / 8, kMT = kM / 8;
  constexpr int kPN = D / Cfg::kDqParts, kPT = kPN / 8;  // dQ columns and column tiles per part
  constexpr int kKVBytes = kN * D * static_cast<int>(sizeof(T)), kQBytes = kM * D * static_cast<int>(sizeof(T));
  constexpr int kDsBytes = 64 * kM * static_cast<int>(sizeof(T));
  constexpr float kLog2e = attn::Base2Exp::kFromNatural;
  const int tid = static_cast<int>(threadIdx.x), wgi = tid / 128, t = tid % 128, warp = t / 32, lane = tid % 32;
  const int n0 = static_cast<int>(blockIdx.x) * kN;
  const int64_t bh = blockIdx.y;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  unsigned char* sk = smem_raw + pad;
  unsigned char* sv = sk + kKVBytes;
  unsigned char* sq = sv + kKVBytes;      // 2 buffers
  unsigned char* sdo = sq + 2 * kQBytes;  // 2 buffers
  unsigned char* sds = sdo + 2 * kQBytes;  // one [64][kM] tile per warpgroup
  float* xchg = reinterpret_cast<float*>(sds + kWG * kDsBytes);
  float* sstat = xchg + Cfg::kXchgFloats;  // [2][lse kM | delta kM]
  unsigned char* my_ds = sds + wgi * kDsBytes;
  const uint32_t ak = raw + pad, av = smem_addr(sv), aq = smem_addr(sq), ado = smem_addr(sdo);
  const uint32_t ads = smem_addr(my_ds);

  const T* qg = q + bh * nq * D;
  const T* dog = dout + bh * nq * D;
  const float* lse_bh = lse + bh * nq;
  const float* delta_bh = delta + bh * nq;
  const int m_blocks = (nq + kM - 1) / kM;

  load_swizzled<T, D, kN, Cfg::kThreads>(sk, k + (bh * nk + n0) * D, nk - n0, tid);
  load_swizzled<T, D, kN, Cfg::kThreads>(sv, v + (bh * nk + n0) * D, nk - n0, tid);
  // Q, dO and the rows' lse (natural log) and delta of query block i into buffer i % 2.
  auto load_block = [&](int i) {
    const int m0 = i * kM, buf = i & 1;
    const int64_t off = static_cast<int64_t>(m0) * D;
    load_swizzled<T, D, kM, Cfg::kThreads>(sq + buf * kQBytes, qg + off, nq - m0, tid);
    load_swizzled<T, D, kM, Cfg::kThreads>(sdo + buf * kQBytes, dog + off, nq - m0, tid);
    for (int s = tid; s < 2 * kM; s += Cfg::kThreads) {
      const int r = s % kM;
      const bool valid = m0 + r < nq;
      cp_async_4(sstat + buf * 2 * kM + s, (s < kM ? lse_bh : delta_bh) + (valid ? m0 + r : 0), valid);
    }
  };
  load_block(0);
  cp_async_commit();

  using Descs = BwdOperandDescs<D, kN, kM>;
  // Per thread, as m16n8 accumulator tiles (warp w of the warpgroup holds rows 16 w .. 16 w + 15).
  float s[kMT][4], dp[kMT][4];  // S^T then P^T; dP^T then dS^T
  float dkt[kDT][4], dvt[kDT][4], dqt[kPT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dkt[i][e] = dvt[i][e] = 0.0f;
  float (&s_flat)[kM / 2] = reinterpret_cast<float (&)[kM / 2]>(s);
  float (&dp_flat)[kM / 2] = reinterpret_cast<float (&)[kM / 2]>(dp);
  float (&dk_flat)[D / 2] = reinterpret_cast<float (&)[D / 2]>(dkt);
  float (&dv_flat)[D / 2] = reinterpret_cast<float (&)[D / 2]>(dvt);
  float (&dq_flat)[kPN / 2] = reinterpret_cast<float (&)[kPN / 2]>(dqt);
  uint32_t pf[kM / 16][4], dsf[kM / 16][4];  // P^T and dS^T as A fragments

  // Only the last key block can hold keys past nk (CTA-uniform): their rows of
  // K are zeros, so their scores would be exp2(-lse), which can overflow; they
  // are masked to 0. Query rows past nq need no mask: their dO and delta are
  // zeros, so their P^T dO and dS^T vanish (as in the mma.sync kernel).
  const bool key_edge = n0 + kN > nk;
  const int key_row = n0 + wgi * 64 + warp * 16 + lane / 4;  // + 8 for accumulator entries 2, 3
  const float scale_log2 = scale * kLog2e;

  // As in the forward, every accumulator and A fragment an MMA group reads or
  // writes is computed and pinned (fence_operands) before the wgmma.fence that
  // precedes the group, and touched again only after the wait that covers it.
  // Descriptors are not pinned: each is made just before its instruction
  // (arrays of them would hold 64 registers at D = 128).
  for (int i = 0; i < m_blocks; ++i) {
    const int m0 = i * kM, buf = i & 1;
    copies_landed<0>();  // block i; every warpgroup is done with block i - 1 and the exchange
    if (i + 1 < m_blocks) load_block(i + 1);
    cp_async_commit();
    const uint32_t qb = aq + static_cast<uint32_t>(buf * kQBytes), dob = ado + static_cast<uint32_t>(buf * kQBytes);
    const float* stat = sstat + buf * 2 * kM;

    // acc = rows_w cols^T, one commit group: S^T = K_w Q^T, dP^T = V_w dO^T.
    auto mma_transposed = [&](float (&acc)[kM / 2], uint32_t rows, uint32_t cols) {
      wgmma_ss<T, kM, false>(acc, Descs::keys(rows, wgi, 0), Descs::queries(cols, 0));
#pragma unroll
      for (int kk = 1; kk < D / 16; ++kk) wgmma_ss<T, kM, true>(acc, Descs::keys(rows, wgi, kk), Descs::queries(cols, kk));
      wgmma_commit();
    };
    auto mma_s = [&] { mma_transposed(s_flat, ak, qb); };
    auto mma_dp = [&] { mma_transposed(dp_flat, av, dob); };
    // P^T of column tile qt, in place.
    auto probs = [&](int qt) {
      // the lse of this lane's two query columns, in the base-2 domain
      const float2 l2 = *reinterpret_cast<const float2*>(stat + qt * 8 + 2 * (lane % 4));
      const float lse2[2] = {attn::lse_in_domain<attn::Base2Exp>(l2.x), attn::lse_in_domain<attn::Base2Exp>(l2.y)};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[qt][e] = exp2f(fmaf(s[qt][e], scale_log2, -lse2[e & 1]));
        if (key_edge && key_row + 8 * (e / 2) >= nk) s[qt][e] = 0.0f;
      }
    };
    // dS^T of column tile qt in place, from dP^T and P^T (p(e): its element e).
    auto score_grads = [&](int qt, auto&& p) {
      const float2 d2 = *reinterpret_cast<const float2*>(stat + kM + qt * 8 + 2 * (lane % 4));  // 0 past nq
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[qt][e] = attn::score_grad(p(e), dp[qt][e], e & 1 ? d2.y : d2.x);
    };
    if constexpr (!Cfg::kRegisterLean) {
      // Both products in flight; P^T while dP^T runs, dS^T from P^T in fp32.
      wgmma_fence();
      mma_s();
      mma_dp();
      wgmma_wait<1>();
      fence_operands(s_flat);
#pragma unroll
      for (int qt = 0; qt < kMT; ++qt) probs(qt);
      wgmma_wait<0>();
      fence_operands(dp_flat);
#pragma unroll
      for (int qt = 0; qt < kMT; ++qt) score_grads(qt, [&](int e) { return s[qt][e]; });
#pragma unroll
      for (int kc = 0; kc < kM / 16; ++kc) {
        to_a_fragment<T, kMT>(pf[kc], s, kc);
        to_a_fragment<T, kMT>(dsf[kc], dp, kc);
      }
    } else {
      // One product at a time: S^T becomes P^T's fragments before dP^T exists,
      // and dS^T reads P^T back from them (16-bit, as dV's product uses it).
      wgmma_fence();
      mma_s();
      wgmma_wait<0>();
      fence_operands(s_flat);
#pragma unroll
      for (int kc = 0; kc < kM / 16; ++kc) {
        probs(2 * kc);
        probs(2 * kc + 1);
        to_a_fragment<T, kMT>(pf[kc], s, kc);
      }
      wgmma_fence();
      mma_dp();
      wgmma_wait<0>();
      fence_operands(dp_flat);
#pragma unroll
      for (int kc = 0; kc < kM / 16; ++kc) {
#pragma unroll
        for (int qt = 2 * kc; qt < 2 * kc + 2; ++qt)
          score_grads(qt, [&](int e) {
            const float2 pair = Half2<T>::unpack(pf[kc][2 * (qt % 2) + e / 2]);
            return e % 2 ? pair.y : pair.x;
          });
        to_a_fragment<T, kMT>(dsf[kc], dp, kc);
      }
    }
    // dS^T into this warpgroup's tile: fragment j of kc is rows +8 (j % 2), columns 16 kc + 8 (j / 2).
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = warp * 16 + lane / 4 + 8 * (j % 2), c = kc * 16 + 8 * (j / 2);
        *reinterpret_cast<uint32_t*>(my_ds + Swizzle<kM>::offset(64, r, c) + 4 * (lane % 4)) = dsf[kc][j];
      }
    fence_proxy_async();
    bar_sync(1 + wgi, 128);  // the warpgroup's whole dS^T tile is written

    // dV += P^T dO and dK += dS^T Q, then dQ_w = dS_w K_w: two commit groups.
    fence_operands(pf);
    fence_operands(dsf);
    fence_operands(dv_flat);
    fence_operands(dk_flat);
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) wgmma_rs<T, D>(dv_flat, pf[kc], Descs::queries_n(dob, kc));
#pragma unroll
    for (int kc = 0; kc < kM / 16; ++kc) wgmma_rs<T, D>(dk_flat, dsf[kc], Descs::queries_n(qb, kc));
    wgmma_commit();
    if constexpr (Cfg::kRegisterLean) {  // P^T and dS^T die before dQ's accumulators are born
      wgmma_wait<0>();
      fence_operands(dv_flat);
      fence_operands(dk_flat);
    }
    float* dq_bh = dq_accum + bh * nq * D;
#pragma unroll
    for (int part = 0; part < Cfg::kDqParts; ++part) {  // columns kPN part .. kPN part + kPN - 1
      if (Cfg::kRegisterLean || part > 0) wgmma_fence();
      wgmma_ss<T, kPN, false, true>(dq_flat, Descs::ds(ads, 0), Descs::keys_n(ak, wgi, 0, part));
#pragma unroll
      for (int kc = 1; kc < 4; ++kc)
        wgmma_ss<T, kPN, true, true>(dq_flat, Descs::ds(ads, kc), Descs::keys_n(ak, wgi, kc, part));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(dv_flat);
      fence_operands(dk_flat);
      fence_operands(dq_flat);

      // Column tile g = kPT part + dt belongs to warpgroup g % kWG, which adds the others' partials of it.
      if constexpr (kWG > 1) {
#pragma unroll
        for (int dt = 0; dt < kPT; ++dt) {
          const int g = kPT * part + dt, owner = g % kWG;
          if (owner == wgi) continue;
          const int slot = (wgi - owner + kWG) % kWG - 1;
          *reinterpret_cast<float4*>(xchg + ((g * (kWG - 1) + slot) * 128 + t) * 4) =
              make_float4(dqt[dt][0], dqt[dt][1], dqt[dt][2], dqt[dt][3]);
        }
        __syncthreads();
#pragma unroll
        for (int dt = 0; dt < kPT; ++dt) {
          const int g = kPT * part + dt;
          if (g % kWG != wgi) continue;
#pragma unroll
          for (int slot = 0; slot < kWG - 1; ++slot) {
            const float4 x = *reinterpret_cast<const float4*>(xchg + ((g * (kWG - 1) + slot) * 128 + t) * 4);
            dqt[dt][0] += x.x;
            dqt[dt][1] += x.y;
            dqt[dt][2] += x.z;
            dqt[dt][3] += x.w;
          }
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m0 + warp * 16 + lane / 4 + 8 * h;
        if (r >= nq) continue;
#pragma unroll
        for (int dt = 0; dt < kPT; ++dt)
          if ((kPT * part + dt) % kWG == wgi)
            atomic_add2(dq_bh + static_cast<int64_t>(r) * D + kPN * part + dt * 8 + 2 * (lane % 4), dqt[dt][2 * h],
                        dqt[dt][2 * h + 1]);
      }
    }
  }

  store_dkv<T>(dkt, dvt, dk, dv, bh, nk, key_row, lane, scale);
}

// Same contract as attention_bwd_mma; compiled to a trap for any target but
// sm_90a, like attention_fwd_wgmma.
template <class T, int D, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_bwd_wgmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                        float* dq_accum, T* __restrict__ dk, T* __restrict__ dv, int nq, int nk, float scale) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  bwd_wgmma_cta<T, D, Cfg>(q, k, v, dout, lse, delta, dq_accum, dk, dv, nq, nk, scale);
#endif
}

}  // namespace sgdm::cuda_attn::wg
