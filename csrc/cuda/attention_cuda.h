// Host entry points of the CUDA attention kernels (csrc/cuda/attention.cu),
// called by csrc/cuda/attention_launch.cpp. Torch-free: raw pointers to
// contiguous [B*H, N, D] tensors, D in {32, 64, 128}.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "sgdm/dtype.h"

namespace sgdm::cuda_attn {

struct FwdParams {
  DType dtype;  // kFloat32 (SIMT path), kFloat16 or kBFloat16 (tensor cores)
  const void* q;
  const void* k;
  const void* v;
  void* out;   // [bh, nq, d], q's dtype
  float* lse;  // [bh, nq], natural log
  int64_t bh, nq, nk, d;
  float scale;
};

struct BwdParams {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  const void* out;       // [bh, nq, d]: the forward's output
  const void* dout;      // [bh, nq, d]
  const float* lse;      // [bh, nq]
  const float* grad_lse; // [bh, nq] or null: dL/dlse
  float* delta;          // [bh, nq] workspace: rowsum(dO * O) - dL/dlse
  float* dq_accum;       // [bh, nq, d] fp32 workspace (tensor-core path; zeroed here): dS K unscaled
  void* dq;              // [bh, nq, d], q's dtype (fp32: written directly)
  void* dk;              // [bh, nk, d]: scale dS^T Q
  void* dv;              // [bh, nk, d]: P^T dO
  int64_t bh, nq, nk, d;
  float scale;
};

cudaError_t attention_forward(const FwdParams& p, cudaStream_t stream);

// The Hopper wgmma kernels (attention_hopper.cu), fp16 and bf16 only, for a
// compute capability 9.0 GPU (bf16/fp16 tensors; same contracts as above),
// the default there (attention_launch.cpp). wgmma_built(): whether this build
// holds their sm_90a code.
bool wgmma_built();
cudaError_t attention_forward_wgmma(const FwdParams& p, cudaStream_t stream);
cudaError_t attention_backward_wgmma(const BwdParams& p, cudaStream_t stream);
cudaError_t attention_backward(const BwdParams& p, cudaStream_t stream);

}  // namespace sgdm::cuda_attn
