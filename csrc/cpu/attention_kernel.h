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

// A call of at most this much work (multiply-add equivalents, see
// attention_fwd_work / attention_bwd_work) runs on the calling thread. On the
// shapes of benchmarks/ops_bench.py --small (2 cores, fp32), two threads
// gained 0-20% (1-4 us) below about 2^18 and lost up to 25% on the tiniest
// calls (waking and joining the team, ~3 us); on a loaded machine a parallel
// region can also wait a scheduler slice (ms) for a descheduled team thread
// (parallel.h). The glue packs serially and keeps one key split there too.
constexpr int64_t kAttentionMinParallelWork = int64_t{1} << 18;
// The per-row cost of the online softmax and its bookkeeping (row max, exp,
// rescale, output copy), in multiply-adds: about 50 ns a row alongside the
// products' ~45 G multiply-adds/s on one core here.
constexpr int64_t kAttentionRowWork = 2048;

// Keys rounded up to the widest vector (the packed layout's padding), so every
// ISA build and the glue reach the same serial-or-parallel decision.
inline int64_t attention_padded_keys(int64_t nk) { return (nk + 15) / 16 * 16; }

// Work of the forward: per query row, S = Q K^T over the padded keys, P V and
// the softmax.
inline int64_t attention_fwd_work(int64_t bh, int64_t nq, int64_t nk, int64_t d) {
  return bh * nq * (2 * attention_padded_keys(nk) * d + kAttentionRowWork);
}

// Work of the backward with `splits` key splits of `keys` keys each: per query
// row and split, S, dP, dV, dK and dQ (five products) and the softmax.
inline int64_t attention_bwd_work(int64_t bh, int64_t nq, int64_t keys, int64_t d, int64_t splits) {
  return splits * bh * nq * (5 * attention_padded_keys(keys) * d + kAttentionRowWork);
}

}  // namespace sgdm::cpu
