// sgdm::attention / attention_backward: schemas and the CPU implementation.
//
// The glue packs the operands the per-ISA kernels want (fp32, contiguous,
// K^T pre-scaled, K and V transposed and padded: all O(N d) work) and picks the
// number of key splits of the backward so every thread has a task. A call the
// kernel runs on the calling thread (kAttentionMinParallelWork) is packed there
// too and keeps one key split, so its results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attention.h"
#include "cpu/attention_kernel.h"
#include "cpu/dispatch.h"
#include "cpu/parallel.h"
#include "op_utils.h"

SGDM_CPU_DECLARE(void, attention_fwd_kernel, (const ::sgdm::cpu::AttentionFwdArgs&))
SGDM_CPU_DECLARE(void, attention_bwd_kernel, (const ::sgdm::cpu::AttentionBwdArgs&))

namespace sgdm {

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "sgdm.attention: q must be [B, H, Nq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "sgdm.attention: k must be [B, H, Nk, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "sgdm.attention: v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "sgdm.attention: k ", k.sizes(), " does not match q ", q.sizes(), " in B, H or D");
  dtype_tag(q, "q");  // a floating dtype: an integer q would come back truncated to integers
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sgdm.attention: q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "sgdm.attention: q, k, v must share a device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(q.numel() > 0 && k.numel() > 0, "sgdm.attention: empty q ", q.sizes(), " or k ", k.sizes());
}

void check_attention_backward_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& out,
                                     const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "sgdm.attention backward: grad_out must have q's shape ", q.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "sgdm.attention backward: out must have q's shape ", q.sizes(), ", got ",
              out.sizes());
  const std::vector<int64_t> lse_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "sgdm.attention backward: lse must be [B, H, Nq] = ",
              at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  TORCH_CHECK(!grad_lse.has_value() || !grad_lse->defined() || grad_lse->sizes() == lse.sizes(),
              "sgdm.attention backward: grad_lse must have lse's shape ", lse.sizes());
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK(t->device() == q.device(), "sgdm.attention backward: all tensors must be on ", q.device());
  }
}

namespace {

constexpr int64_t kPad = 16;  // the widest vector (AVX-512 fp32)

// Row stride of the packed K^T / V^T: a multiple of the widest vector whose
// byte stride is an odd number of 64-byte lines, so the D rows a micro-kernel
// walks spread over all L1 sets (a 4 KiB-multiple stride thrashed one set and
// cost about 30% of the forward at N = 1024).
int64_t packed_ld(int64_t n) { return (n + 2 * kPad - 1) / (2 * kPad) * (2 * kPad) + kPad; }

// [B, H, N, D] (any strides) -> fp32 [B*H, D, ldk] transposed, times `scale`,
// zero-padded to ldk columns (written once, so no zero fill of the whole
// buffer). A plain loop: ATen's strided multiply cost 2.4 us of a 21 us
// forward at N = 16, more than the copy itself. Serial unless `parallel`.
at::Tensor pack_transposed(const at::Tensor& x_in, int64_t ldk, double scale, bool parallel) {
  const at::Tensor x = x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat);
  const int64_t h = x.size(1), n = x.size(2), d = x.size(3), bh = x.size(0) * h;
  auto out = at::empty({bh, d, ldk}, x.options().dtype(at::kFloat));
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), sn = x.stride(2), sd = x.stride(3);
  const float f = static_cast<float>(scale);
  at::parallel_for(0, bh, parallel ? cpu::grain_for(n * d) : bh, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* xs = src + (i / h) * sb + (i % h) * sh;
      float* o = dst + i * d * ldk;
      // Tiles of kPad keys: each output row gets one whole 64-byte line per
      // tile, read from kPad input rows that stay in L1 (key by key, the
      // stores went to d different lines in turn).
      for (int64_t j0 = 0; j0 < n; j0 += kPad) {
        const int64_t j1 = std::min(n, j0 + kPad);
        for (int64_t c = 0; c < d; ++c) {
          for (int64_t j = j0; j < j1; ++j) o[c * ldk + j] = xs[j * sn + c * sd] * f;
        }
      }
      for (int64_t c = 0; c < d; ++c) std::fill(o + c * ldk + n, o + (c + 1) * ldk, 0.0f);
    }
  });
  return out;
}

at::Tensor flat_f32(const at::Tensor& x) {
  return x.to(at::kFloat).contiguous().view({x.size(0) * x.size(1), x.size(2), x.size(3)});
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, double scale) {
  check_attention_inputs(q, k, v);
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  const int64_t ldk = packed_ld(nk);
  const auto qf = flat_f32(q);
  const bool parallel = cpu::attention_fwd_work(b * h, nq, nk, d) > cpu::kAttentionMinParallelWork;
  const auto kt = pack_transposed(k, ldk, scale, parallel);
  const auto vf = flat_f32(v);
  auto out = at::empty({b, h, nq, d}, q.options().dtype(at::kFloat));
  auto lse = at::empty({b, h, nq}, q.options().dtype(at::kFloat));
  const cpu::AttentionFwdArgs args{qf.data_ptr<float>(), kt.data_ptr<float>(), vf.data_ptr<float>(),
                                   out.data_ptr<float>(), lse.data_ptr<float>(), b * h, nq, nk, d, ldk};
  SGDM_CPU_DISPATCH(attention_fwd_kernel, args);
  return {out.to(q.scalar_type()), lse};
}

// Enough key splits that B*H*splits covers the threads, never more than blocks.
int64_t backward_splits(int64_t bh, int64_t nk) {
  const int64_t blocks = (nk + cpu::kAttentionBwdBlockK - 1) / cpu::kAttentionBwdBlockK;
  const int64_t threads = at::get_num_threads();
  return std::max<int64_t>(1, std::min(blocks, (threads + bh - 1) / bh));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, double scale) {
  check_attention_inputs(q, k, v);
  check_attention_backward_inputs(grad_out, q, out, lse, grad_lse);
  const int64_t b = q.size(0), h = q.size(1), nq = q.size(2), nk = k.size(2), d = q.size(3);
  const int64_t bh = b * h, ldk = packed_ld(nk);
  const auto dout = flat_f32(grad_out);
  // delta_i = rowsum(dO * O); a gradient flowing into lse enters as -dL/dlse
  // because d lse_i / d s_ij = P_ij.
  auto delta = (dout * flat_f32(out)).sum(-1);
  if (grad_lse.has_value() && grad_lse->defined()) delta = delta - grad_lse->to(at::kFloat).reshape({bh, nq});
  delta = delta.contiguous();
  const auto qf = flat_f32(q);
  const auto kf = flat_f32(k);
  // A backward the kernel runs on the calling thread keeps one key split (no
  // second dq buffer, and dq bits independent of the thread count). Splits
  // only add work, so with more the kernel still runs in parallel.
  const bool parallel = cpu::attention_bwd_work(bh, nq, nk, d, 1) > cpu::kAttentionMinParallelWork;
  const int64_t splits = parallel ? backward_splits(bh, nk) : 1;
  const auto kt = pack_transposed(k, ldk, scale, parallel), vt = pack_transposed(v, ldk, 1.0, parallel);
  const auto lse_f = lse.to(at::kFloat).contiguous();
  auto dq_parts = at::zeros({splits, b, h, nq, d}, q.options().dtype(at::kFloat));
  auto dk = at::empty({b, h, nk, d}, q.options().dtype(at::kFloat));
  auto dv = at::empty({b, h, nk, d}, q.options().dtype(at::kFloat));
  const cpu::AttentionBwdArgs args{qf.data_ptr<float>(),     kf.data_ptr<float>(),    kt.data_ptr<float>(),
                                   vt.data_ptr<float>(),     dout.data_ptr<float>(),  lse_f.data_ptr<float>(),
                                   delta.data_ptr<float>(),  dq_parts.data_ptr<float>(), dk.data_ptr<float>(),
                                   dv.data_ptr<float>(),     bh, nq, nk, d, ldk, splits, static_cast<float>(scale)};
  SGDM_CPU_DISPATCH(attention_bwd_kernel, args);
  auto dq = splits == 1 ? dq_parts.select(0, 0) : dq_parts.sum(0);
  dq.mul_(scale);
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace sgdm

TORCH_LIBRARY_FRAGMENT(sgdm, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? grad_lse, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(sgdm, CPU, m) {
  m.impl("attention", &sgdm::attention_fwd_cpu);
  m.impl("attention_backward", &sgdm::attention_bwd_cpu);
}
