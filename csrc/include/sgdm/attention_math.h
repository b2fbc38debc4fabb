// Per-row maths of flash attention, shared by the CPU and CUDA kernels.
//
// Forward (FlashAttention-2, Dao 2023, Alg. 1): a query row keeps a running
// maximum m and a running sum l of exp(s - m) over the key blocks seen so
// far; when a block with maximum m_blk arrives, the old accumulator and l are
// rescaled by alpha = exp(m_old - m_new).  At the end out = acc / l and the
// log-sum-exp lse = m + log(l) is saved for the backward.
//
// Backward (Alg. 2): P = exp(s - lse) is recomputed from the scores, and
// dS = P * (dP - delta) with delta = rowsum(dO * O).
//
// The exponential is a policy so that the CPU kernel works in the natural
// domain (at::vec's exp) and the CUDA kernel in base 2 (ex2.approx, with the
// scores pre-multiplied by log2(e)); lse is always stored in natural log.
#pragma once

#include <cmath>

#include "sgdm/macros.h"

namespace sgdm::attn {

struct NaturalExp {
  static SGDM_INLINE float exp(float x) { return ::expf(x); }
  static SGDM_INLINE float log(float x) { return ::logf(x); }
  // Multiply a natural-log quantity by this to get the policy's domain.
  static constexpr float kFromNatural = 1.0f;
};

struct Base2Exp {
  static SGDM_INLINE float exp(float x) { return ::exp2f(x); }
  static SGDM_INLINE float log(float x) { return ::log2f(x); }
  static constexpr float kFromNatural = 1.4426950408889634f;  // log2(e)
};

SGDM_INLINE float neg_infinity() { return -INFINITY; }
SGDM_INLINE float pos_infinity() { return INFINITY; }

// Running state of one query row; m is -inf until the first key is seen.
struct OnlineRow {
  float m;
  float l;
};

SGDM_INLINE OnlineRow online_init() { return OnlineRow{neg_infinity(), 0.0f}; }

// Moves the row's maximum to max(m, block_max) and returns alpha, the factor
// by which the old accumulator and sum must be scaled.  A row that has seen
// nothing yet gets alpha = 0 so that no inf - inf appears.
template <class Exp>
SGDM_INLINE float online_rescale(OnlineRow& row, float block_max) {
  const float m_new = row.m > block_max ? row.m : block_max;
  const float alpha = row.m == neg_infinity() ? 0.0f : Exp::exp(row.m - m_new);
  row.m = m_new;
  row.l *= alpha;
  return alpha;
}

// Adds the block's sum of exp(s - m_new) after online_rescale.
SGDM_INLINE void online_add(OnlineRow& row, float block_sum) { row.l += block_sum; }

// 1 / l, the factor turning the accumulator into the output row.
SGDM_INLINE float online_inv_sum(const OnlineRow& row) { return row.l > 0.0f ? 1.0f / row.l : 0.0f; }

// Natural log-sum-exp of the row's scores, from the state in the Exp domain.
template <class Exp>
SGDM_INLINE float online_lse(const OnlineRow& row) {
  return (row.m + Exp::log(row.l)) / Exp::kFromNatural;
}

// The natural lse converted to the Exp domain, subtracted from scores to get P.
template <class Exp>
SGDM_INLINE float lse_in_domain(float lse) { return lse * Exp::kFromNatural; }

// dS_ij = P_ij (dP_ij - delta_i)  (softmax Jacobian-vector product).
SGDM_INLINE float score_grad(float p, float dp, float delta) { return p * (dp - delta); }

}  // namespace sgdm::attn
