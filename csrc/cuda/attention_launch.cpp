// sgdm::attention / attention_backward on CUDA: torch glue around the
// torch-free kernels of csrc/cuda/attention.cu, on the current stream.
#include <ATen/Context.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "attention.h"
#include "cuda/attention_cuda.h"
#include "cuda/launch_error.h"
#include "op_utils.h"

namespace sgdm {
namespace {

void check_cuda_supported(const at::Tensor& q, const at::Tensor& k) {
  const int64_t d = q.size(3);
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "sgdm.attention: the CUDA kernel supports head dims 32, 64, 128, got ",
              d);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "sgdm.attention: the CUDA kernel supports float32, float16, bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(0) * q.size(1) <= 65535, "sgdm.attention: B*H must be at most 65535 on CUDA, got ",
              q.size(0) * q.size(1));
  TORCH_CHECK(q.size(2) < (int64_t{1} << 31) && k.size(2) < (int64_t{1} << 31),
              "sgdm.attention: sequence too long for the CUDA kernel");
}

// Contiguous and 16-byte aligned: the kernels copy rows with 16-byte cp.async
// (a contiguous view with an odd storage offset would fault).
at::Tensor kernel_layout(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

void check_launch(cudaError_t err) { check_cuda_launch(err, "attention"); }

// The Hopper wgmma kernels (fp16 / bf16) run on a compute capability 9.0 GPU
// when the build holds their sm_90a code; the mma.sync kernels run elsewhere.
// SGDM_ATTENTION_WGMMA=0 runs the mma.sync kernels there too; =1 requires the
// wgmma kernels, and where they cannot run that is an error, not a silent
// fallback (a benchmark must know what it timed).
bool use_wgmma(const at::Tensor& q) {
  const char* env = std::getenv("SGDM_ATTENTION_WGMMA");
  const std::string_view value = env == nullptr ? "" : env;
  TORCH_CHECK(value.empty() || value == "0" || value == "1", "SGDM_ATTENTION_WGMMA must be 0 or 1, got '", value,
              "'");
  if (value == "0" || q.scalar_type() == at::kFloat) return false;  // fp32 runs the SIMT kernel either way
  const bool required = value == "1";
  if (!cuda_attn::wgmma_built()) {
    TORCH_CHECK(!required, "SGDM_ATTENTION_WGMMA=1: this build of sgdm has no sm_90a code; rebuild with 9.0a in "
                "TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0a\")");
    return false;
  }
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(q.get_device());  // cached by torch
  const bool hopper = prop->major == 9 && prop->minor == 0;
  TORCH_CHECK(hopper || !required, "SGDM_ATTENTION_WGMMA=1: the wgmma kernels need a compute capability 9.0 GPU "
              "(H100, H200); ", q.device(), " is ", prop->major, ".", prop->minor);
  return hopper;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in, double scale) {
  check_attention_inputs(q_in, k_in, v_in);
  check_cuda_supported(q_in, k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const cuda_attn::FwdParams p{dtype_tag(q, "q"), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                               lse.data_ptr<float>(), q.size(0) * q.size(1), q.size(2), k.size(2), q.size(3),
                               static_cast<float>(scale)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(use_wgmma(q) ? cuda_attn::attention_forward_wgmma(p, stream)
                                  : cuda_attn::attention_forward(p, stream));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse, double scale) {
  check_attention_inputs(q_in, k_in, v_in);
  check_attention_backward_inputs(grad_out, q_in, out, lse, grad_lse);
  check_cuda_supported(q_in, k_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const auto dout = kernel_layout(grad_out.to(q.scalar_type()));
  const auto out_k = kernel_layout(out.to(q.scalar_type()));
  const auto lse_f = lse.to(at::kFloat).contiguous();
  // delta_i = rowsum(dO * O) - dL/dlse_i (see sgdm/ops/attention.py) is computed by the kernels.
  at::Tensor grad_lse_f;
  if (grad_lse.has_value() && grad_lse->defined()) grad_lse_f = grad_lse->to(at::kFloat).contiguous();
  auto delta = at::empty(lse_f.sizes(), lse_f.options());
  const bool fp32 = q.scalar_type() == at::kFloat;
  // dQ of the tensor-core backward is summed over key blocks with fp32 atomics: not bit-reproducible.
  // Under torch.use_deterministic_algorithms(True) that is torch's error (a warning with warn_only).
  if (!fp32) {
    at::globalContext().alertNotDeterministic(
        "sgdm::attention_backward on CUDA in fp16/bf16 (dQ is summed with atomics; SGDM_KERNELS=0 runs the "
        "PyTorch reference, the fp32 backward is deterministic)");
  }
  auto dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  // The tensor-core backward accumulates dS K in fp32 (zeroed, scaled and cast by the kernels).
  auto dq_accum = fp32 ? at::Tensor() : at::empty(q.sizes(), q.options().dtype(at::kFloat));
  auto dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  auto dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  cuda_attn::BwdParams p{};
  p.dtype = dtype_tag(q, "q");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out_k.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse_f.data_ptr<float>();
  p.grad_lse = grad_lse_f.defined() ? grad_lse_f.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = fp32 ? nullptr : dq_accum.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.bh = q.size(0) * q.size(1);
  p.nq = q.size(2);
  p.nk = k.size(2);
  p.d = q.size(3);
  p.scale = static_cast<float>(scale);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(use_wgmma(q) ? cuda_attn::attention_backward_wgmma(p, stream)
                                  : cuda_attn::attention_backward(p, stream));
  return {dq, dk, dv};
}

}  // namespace
}  // namespace sgdm

TORCH_LIBRARY_FRAGMENT(sgdm, m) {
  m.def("_attention_wgmma_built() -> bool", &sgdm::cuda_attn::wgmma_built);
}

TORCH_LIBRARY_IMPL(sgdm, CUDA, m) {
  m.impl("attention", &sgdm::attention_fwd_cuda);
  m.impl("attention_backward", &sgdm::attention_bwd_cuda);
}
