// Arguments of the per-ISA CPU flash-attention kernels (attention_kernel.cpp).
//
// All operands are fp32, contiguous, with batch and heads flattened into one
// leading dimension of size bh. The op glue (csrc/attention.cpp) prepares
// them: K^T (pre-multiplied by the softmax scale) and V^T packed transposed
// into [bh, d, ldk], ldk a multiple of the widest vector, with zero padding.
#pragma once

#include <cstdint>

namespace sgdm::cpu {

struct AttentionFwdArgs {
  const float* q;   // [bh, nq, d]
  const float* kt;  // [bh, d, ldk], scale * K^T
  const float* v;   // [bh, nk, d]
  float* out;       // [bh, nq, d]
  float* lse;       // [bh, nq], natural log-sum-exp of the scaled scores
  int64_t bh, nq, nk, d, ldk;
};

struct AttentionBwdArgs {
  const float* q;      // [bh, nq, d]
  const float* k;      // [bh, nk, d]
  const float* kt;     // [bh, d, ldk], scale * K^T
  const float* vt;     // [bh, d, ldk]
  const float* dout;   // [bh, nq, d]
  const float* lse;    // [bh, nq]
  const float* delta;  // [bh, nq]: rowsum(dO * O) - dL/dlse
  float* dq_parts;     // [splits, bh, nq, d], zeroed; dS K, before the scale
  float* dk;           // [bh, nk, d]
  float* dv;           // [bh, nk, d]
  int64_t bh, nq, nk, d, ldk, splits;
  float scale;
};

// Key rows per block in the backward, and therefore the granularity of the
// key splits the glue chooses.
constexpr int64_t kAttentionBwdBlockK = 64;

}  // namespace sgdm::cpu
