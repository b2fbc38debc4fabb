// FlashAttention-2 forward for fp16 / bf16 on tensor cores (Dao 2023, Alg. 1).
//
// A CTA holds one or two groups of 4 warps (FwdTile below). Each group owns
// 64 kR query rows of one (batch, head) and streams 64-key blocks of K and V
// through its own shared memory, double buffered with cp.async. S = Q K^T and
// O += P V are m16n8k16 mma.sync with fp32 accumulators; the online softmax
// (sgdm/attention_math.h, base 2) runs in registers, each row's state
// replicated over the 4 lanes that hold it.
//
// Two groups take turns on the tensor cores (FlashAttention-3's "ping-pong",
// Shah et al. 2024, done here with mma.sync and named barriers): while one
// issues its GEMMs (P(j-1) V(j-1), then Q K(j)^T), the other runs its softmax
// of block j - 1, so the softmax's ALU and MUFU work overlaps the other
// group's mma's. Warp w of either group shares a scheduler (warp id mod 4).
//
// The softmax does little per score: the scale is folded into the exponent
// (one FFMA: exp2(s c - m)); row maxima and sums are balanced trees, not
// chains; and the running max only moves, with the rescale of the
// accumulators, when some row of the warp grows by more than 2^kRescaleLog2
// (FlashAttention-4's conditional rescaling). Between rescales a row's
// probabilities are relative to a stale max, at most 2^8 = 256: fine for fp32
// sums and 16-bit P, and exact in the end because l and O share that max.
#pragma once

#include <cfloat>
#include <type_traits>

#include "attention_mma.cuh"
#include "sgdm/attention_math.h"

namespace sgdm::cuda_attn {

// The scale_log2 argument of the tensor-core forwards (scale * log2(e)). They
// mask keys past nk with an infinite raw score, which a zero scale would turn
// into NaN; the smallest normal float gives the same probabilities in fp32
// (every scaled score rounds to zero).
inline float fwd_scale_log2(float scale) {
  return (scale == 0.0f ? FLT_MIN : scale) * attn::Base2Exp::kFromNatural;
}

// Tile shape: kR row tiles of 16 query rows per warp, kGroups groups of 4
// warps per CTA (2: they take turns), kMinBlocks CTAs per SM for the register
// budget.
template <int D, int kR_, int kGroups_, int kMinBlocks_>
struct FwdConfig {
  static_assert(kGroups_ == 1 || kGroups_ == 2, "one group, or two taking turns");
  static constexpr int kR = kR_, kGroups = kGroups_, kMinBlocks = kMinBlocks_;
  static constexpr int kGroupM = 64 * kR, kM = kGroups * kGroupM, kN = 64;
  static constexpr int kGroupThreads = 128, kThreads = kGroups * kGroupThreads, kLd = D + 8;
  static constexpr int kGroupSmemElems = (kGroupM + 4 * kN) * kLd;  // Q, 2 x K, 2 x V
  template <class T>
  static constexpr int smem_bytes() {
    return kGroups * kGroupSmemElems * static_cast<int>(sizeof(T));
  }
};

// Measured on an H200 (bf16, B*H = 64, N = 4096, against the previous
// one-group kernel without the softmax changes; benchmarks/RESULTS.md):
// - D <= 64: two row tiles per warp, so that every K and V fragment read from
//   shared memory feeds two mma's, and one group per CTA with 2 (D = 64) or 3
//   (D = 32) CTAs per SM: 1.14x / 1.11x. With the tree reductions below the
//   turns gave nothing at D = 64 (1.12x) and cost occupancy at D = 32 (0.94x).
// - D = 128: one row tile per warp, so that the accumulators stay in
//   registers, and two groups taking turns: 1.14x.
template <int D>
using FwdTile = std::conditional_t<(D > 64), FwdConfig<D, 1, 2, 1>,
                                   std::conditional_t<(D > 32), FwdConfig<D, 2, 1, 2>, FwdConfig<D, 2, 1, 3>>>;

// Largest growth of a row's max (base-2 units) absorbed without a rescale.
constexpr float kRescaleLog2 = 8.0f;

// op over n values as a balanced tree: log2(n) dependent steps instead of a
// chain of n - 1 (two warps per scheduler cannot hide a chain's latency).
// The steps are unrolled at compile time: a runtime outer loop left x in
// local memory at n = 16.
template <int w, int n, class Op>
__device__ __forceinline__ void tree_step(float (&x)[n], Op op) {
  if constexpr (w > 0) {
#pragma unroll
    for (int i = 0; i < w; ++i) x[i] = op(x[i], x[i + w]);
    tree_step<w / 2>(x, op);
  }
}
template <int n, class Op>
__device__ __forceinline__ float tree_reduce(float (&x)[n], Op op) {
  static_assert((n & (n - 1)) == 0, "power of two");
  tree_step<n / 2>(x, op);
  return x[0];
}

// Named barrier ids: 1 + g, the group's own 128 threads; 3 + g, "group g's
// turn" (the 128 threads of g wait on it, the other group's 128 arrive).
constexpr int kGroupBarrier = 1, kTurnBarrier = 3;

// acc[dt] *= alpha for the accumulator row h (0: lane / 4, 1: lane / 4 + 8) of one m16n8 row tile.
template <int kDT>
__device__ __forceinline__ void scale_rows(float (&acc)[kDT][4], int h, float alpha) {
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
    acc[dt][2 * h] *= alpha;
    acc[dt][2 * h + 1] *= alpha;
  }
}

// Softmax of one key block over kR row tiles of m16n8 accumulators (a lane
// holds rows lane / 4 and lane / 4 + 8 of each tile). In the block that holds
// keys past nk (`edge`; its first key is `key_base`) those scores become
// `masked`. A row's running max moves only when some row of the warp grows by
// more than 2^kRescaleLog2; then rescale(r, h, alpha) is called for every row
// (h = 0: row lane / 4 of tile r, h = 1: row lane / 4 + 8) to scale its output
// accumulators. s becomes exp2(s scale_log2 - m) in place, each row's sum
// grows by this lane's share (the quad is summed at the end), and P is packed
// as 16-bit A fragments. Shared by the mma.sync kernel and the wgmma one
// (attention_wgmma.cuh), whose warpgroup accumulator is, per warp, the same
// tiles.
template <class T, int kR, int kNT, class Rescale>
__device__ __forceinline__ void fwd_softmax_block(float (&s)[kR][kNT][4], attn::OnlineRow (&row)[kR][2],
                                                  uint32_t (&pf)[kR][kNT / 2][4], bool edge, int key_base, int nk,
                                                  float scale_log2, bool neg, float masked, int lane,
                                                  Rescale rescale) {
  if (edge) {
    const int key0 = key_base + 2 * (lane % 4);
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (key0 + nt * 8 + (e & 1) >= nk) s[r][nt][e] = masked;
  }
  float block_max[kR][2];
  bool grow = false;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // h = 0: row lane/4, h = 1: row lane/4 + 8
      // max over the block of s * scale_log2, from the raw scores' max (or min, for a negative scale)
      float part[kNT];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
        part[nt] = neg ? fmaxf(-s[r][nt][2 * h], -s[r][nt][2 * h + 1]) : fmaxf(s[r][nt][2 * h], s[r][nt][2 * h + 1]);
      const float mx = quad_max(tree_reduce<kNT>(part, [](float a, float b) { return fmaxf(a, b); }));
      block_max[r][h] = (neg ? -mx : mx) * scale_log2;
      grow |= block_max[r][h] > row[r][h].m + kRescaleLog2;
    }
  }
  if (__any_sync(0xffffffffu, grow)) {  // warp-uniform: move the max of every row of the warp
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        rescale(r, h, attn::online_rescale<attn::Base2Exp>(row[r][h], block_max[r][h]));
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float neg_m = -row[r][h].m;
      float part[kNT];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        float& x0 = s[r][nt][2 * h];
        float& x1 = s[r][nt][2 * h + 1];
        x0 = exp2f(fmaf(x0, scale_log2, neg_m));
        x1 = exp2f(fmaf(x1, scale_log2, neg_m));
        part[nt] = x0 + x1;
      }
      // this lane's share; the quad is summed at the end
      attn::online_add(row[r][h], tree_reduce<kNT>(part, [](float a, float b) { return a + b; }));
    }
#pragma unroll
    for (int kc = 0; kc < kNT / 2; ++kc) {
      pf[r][kc][0] = Half2<T>::pack(s[r][2 * kc][0], s[r][2 * kc][1]);
      pf[r][kc][1] = Half2<T>::pack(s[r][2 * kc][2], s[r][2 * kc][3]);
      pf[r][kc][2] = Half2<T>::pack(s[r][2 * kc + 1][0], s[r][2 * kc + 1][1]);
      pf[r][kc][3] = Half2<T>::pack(s[r][2 * kc + 1][2], s[r][2 * kc + 1][3]);
    }
  }
}

// Writes out = acc / l and lse for the kR row tiles tile0 .. tile0 + kR - 1 of
// the rows from m0 (rows at or past nq are skipped), after summing each row's
// l over its quad.
template <class T, int D, int kR>
__device__ __forceinline__ void fwd_store_rows(float (&acc)[kR][D / 8][4], attn::OnlineRow (&row)[kR][2],
                                               T* __restrict__ out, float* __restrict__ lse, int64_t bh, int nq,
                                               int m0, int tile0, int lane) {
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row[r][h].l = quad_sum(row[r][h].l);
      const float inv = attn::online_inv_sum(row[r][h]);
      const int rr = m0 + (tile0 + r) * 16 + lane / 4 + 8 * h;
      if (rr >= nq) continue;
      T* orow = out + (bh * nq + rr) * D + 2 * (lane % 4);
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8) =
            Half2<T>::pack(acc[r][dt][2 * h] * inv, acc[r][dt][2 * h + 1] * inv);
      if (lane % 4 == 0) lse[bh * nq + rr] = attn::online_lse<attn::Base2Exp>(row[r][h]);
    }
  }
}

// scale_log2 = scale * log2(e), any finite value but zero (the launcher
// passes the smallest normal float for a zero scale, which gives the same
// probabilities in fp32).
template <class T, int D, class Cfg = FwdTile<D>>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_fwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                      float* __restrict__ lse, int nq, int nk, float scale_log2) {
  constexpr int kR = Cfg::kR, kN = Cfg::kN, kLd = Cfg::kLd, kDt = D / 8;
  constexpr int kGT = Cfg::kGroupThreads;
  const int group = static_cast<int>(threadIdx.x) / kGT, tid = static_cast<int>(threadIdx.x) % kGT;
  const int warp = tid / 32, lane = tid % 32;
  const int cta_m0 = static_cast<int>(blockIdx.x) * Cfg::kM;
  const int m0 = cta_m0 + group * Cfg::kGroupM;
  // Both groups have rows (a CTA-uniform condition), or the second one leaves
  // and the first runs alone, without turns.
  const bool turns = Cfg::kGroups == 2 && cta_m0 + Cfg::kGroupM < nq;
  if (m0 >= nq) return;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw) + group * Cfg::kGroupSmemElems;
  T* sk = sq + Cfg::kGroupM * kLd;
  T* sv = sk + 2 * kN * kLd;
  const int group_bar = kGroupBarrier + group;

  const int64_t bh = blockIdx.y;
  const T* qg = q + (bh * nq + m0) * D;
  const T* kg = k + bh * nk * D;
  const T* vg = v + bh * nk * D;
  const int n_blocks = (nk + kN - 1) / kN;
  auto load_kv = [&](int j) {  // key block j into buffer j % 2
    const int64_t off = static_cast<int64_t>(j) * kN * D;
    const int buf = j & 1;
    load_tile_async<T, D, kGT>(sk + buf * kN * kLd, kg + off, D, kN, nk - j * kN, tid);
    load_tile_async<T, D, kGT>(sv + buf * kN * kLd, vg + off, D, kN, nk - j * kN, tid);
  };
  load_tile_async<T, D, kGT>(sq, qg, D, Cfg::kGroupM, nq - m0, tid);
  load_kv(0);
  cp_async_commit();

  // Warp w owns query rows w * 16 kR .. w * 16 kR + 16 kR - 1 of its group's block.
  float acc[kR][kDt][4];
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int i = 0; i < kDt; ++i) acc[r][i][0] = acc[r][i][1] = acc[r][i][2] = acc[r][i][3] = 0.0f;
  attn::OnlineRow row[kR][2];
#pragma unroll
  for (int r = 0; r < kR; ++r) row[r][0] = row[r][1] = attn::online_init();
  uint32_t qf[kR][D / 16][4];
  uint32_t pf[kR][kN / 16][4];  // P of the previous key block as 16-bit A fragments

  // O += P V for key block j (V in buffer j % 2).
  auto pv = [&](int j) {
    const T* vb = sv + (j & 1) * kN * kLd;
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, vb + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + dp * 16 + (lane / 16) * 8);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          mma_16816<T>(acc[r][2 * dp], pf[r][kc], b[0], b[1]);
          mma_16816<T>(acc[r][2 * dp + 1], pf[r][kc], b[2], b[3]);
        }
      }
    }
  };

  if (turns && group == 1) bar_arrive(kTurnBarrier + 0, Cfg::kThreads);  // group 0 goes first
  const bool neg = scale_log2 < 0.0f;
  const float masked = neg ? attn::pos_infinity() : attn::neg_infinity();  // raw score of a key past nk

  for (int j = 0; j < n_blocks; ++j) {
    cp_async_wait<0>();
    bar_sync(group_bar, kGT);  // block j is in shared memory for the whole group
    if (j == 0) {
#pragma unroll
      for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          ldmatrix_x4(qf[r][kk], sq + ((warp * kR + r) * 16 + lane % 16) * kLd + kk * 16 + (lane / 16) * 8);
    }
    const T* kb = sk + (j & 1) * kN * kLd;

    // ---- this group's turn on the tensor cores: P(j-1) V(j-1), then S = Q K(j)^T
    if (turns) bar_sync(kTurnBarrier + group, Cfg::kThreads);
    if (j > 0) pv(j - 1);
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
    // The other group's turn (group 1's last one has no taker).
    if (turns && !(group == 1 && j + 1 == n_blocks)) bar_arrive(kTurnBarrier + 1 - group, Cfg::kThreads);

    // The group is done with K(j) and V(j-1): buffer (j + 1) % 2 takes block j + 1.
    bar_sync(group_bar, kGT);
    if (j + 1 < n_blocks) load_kv(j + 1);
    cp_async_commit();

    // ---- softmax of block j, while the other group has the tensor cores
    fwd_softmax_block<T>(s, row, pf, (j + 1) * kN > nk, j * kN, nk, scale_log2, neg, masked, lane,
                         [&](int r, int h, float alpha) { scale_rows(acc[r], h, alpha); });
  }
  pv(n_blocks - 1);  // V(n - 1) stays in its buffer: nothing was loaded after it
  fwd_store_rows<T, D>(acc, row, out, lse, bh, nq, m0, warp * kR, lane);
}

}  // namespace sgdm::cuda_attn
