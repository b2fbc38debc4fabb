// The Hopper wgmma forward and backward (csrc/cuda/attention_wgmma.cuh,
// attention_wgmma_bwd.cuh) against the production mma.sync kernels
// (attention_fwd.cuh with FwdTile<D>, attention_bwd.cuh): agreement, then
// time, on the same inputs (benchmarks/attention_ab.cuh). The wgmma kernels
// have not run on a GPU before this program: a disagreement is a bug in
// them, and the program exits 1 before any timing.
//
//   nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \
//        -Icsrc/include -Icsrc/cuda benchmarks/attention_wgmma.cu -o attention_wgmma
//   ./attention_wgmma            # needs an H100 / H200; exit status 1 on a disagreement
#include "attention_ab.cuh"
#include "attention_host.cuh"
#include "attention_wgmma.cuh"
#include "attention_wgmma_bwd.cuh"

using namespace sgdm::cuda_attn;
using namespace sgdm_ab;

namespace {

template <class T, int D, class Cfg>
void launch_wgmma(const T* q, const T* k, const T* v, T* o, float* lse, int bh, int nq, int nk, float scale) {
  constexpr int smem = Cfg::template smem_bytes<T>();
  CHECK_CUDA(cudaFuncSetAttribute(&wg::attention_fwd_wgmma<T, D, Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  smem));
  wg::attention_fwd_wgmma<T, D, Cfg><<<dim3((nq + Cfg::kM - 1) / Cfg::kM, bh), Cfg::kThreads, smem>>>(
      q, k, v, o, lse, nq, nk, scale * kLog2e);
  CHECK_CUDA(cudaGetLastError());
}

template <class Cfg>
std::string describe() {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "wgmma: keys/block %d, warpgroups %d, CTAs/SM %d%s", Cfg::kN, Cfg::kWG,
                Cfg::kMinBlocks, Cfg::kOverlap ? ", overlap" : "");
  return buf;
}

// The production mma.sync kernel first, then the wgmma configurations.
template <class T, int D, class... Cfgs>
bool compare_wgmma(int bh, int nq, int nk, int reps) {
  std::vector<FwdVariant<T>> v{{"mma.sync FwdTile (production)", &launch_mma<T, D>}};
  (v.push_back({describe<Cfgs>(), &launch_wgmma<T, D, Cfgs>}), ...);
  return compare<T, D>(v, bh, nq, nk, reps);
}

// ---- backward ----------------------------------------------------------------

// One set of backward tensors, [B*H, N, D] each (the forward's out and lse from the production kernel).
template <class T>
struct BwdBufs {
  T *q = nullptr, *k = nullptr, *v = nullptr, *dout = nullptr, *out = nullptr, *dk = nullptr, *dv = nullptr;
  float *lse = nullptr, *delta = nullptr, *dq = nullptr;  // dq: the fp32 accumulator (unscaled dS K)
};

template <class T>
using BwdLaunch = void (*)(const BwdBufs<T>&, int, int, int, float);

// The production mma.sync backward kernel (attention_bwd.cuh), accumulating into b.dq.
template <class T, int D>
void launch_bwd_mma(const BwdBufs<T>& b, int bh, int nq, int nk, float scale) {
  using Cfg = BwdTile<D>;
  constexpr int smem = Cfg::template smem_bytes<T>();
  CHECK_CUDA(cudaFuncSetAttribute(&attention_bwd_mma<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attention_bwd_mma<T, D><<<dim3((nk + Cfg::kN - 1) / Cfg::kN, bh), Cfg::kThreads, smem>>>(
      b.q, b.k, b.v, b.dout, b.lse, b.delta, b.dq, b.dk, b.dv, nq, nk, scale);
  CHECK_CUDA(cudaGetLastError());
}

template <class T, int D, class Cfg>
void launch_bwd_wgmma(const BwdBufs<T>& b, int bh, int nq, int nk, float scale) {
  constexpr int smem = Cfg::template smem_bytes<T>();
  CHECK_CUDA(cudaFuncSetAttribute(&wg::attention_bwd_wgmma<T, D, Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  smem));
  wg::attention_bwd_wgmma<T, D, Cfg><<<dim3((nk + Cfg::kN - 1) / Cfg::kN, bh), Cfg::kThreads, smem>>>(
      b.q, b.k, b.v, b.dout, b.lse, b.delta, b.dq, b.dk, b.dv, nq, nk, scale);
  CHECK_CUDA(cudaGetLastError());
}

template <class Cfg>
std::string describe_bwd() {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "wgmma backward: warpgroups %d, CTAs/SM %d%s", Cfg::kWG, Cfg::kMinBlocks,
                Cfg::kRegisterLean ? ", lean" : "");
  return buf;
}

template <class T>
std::vector<float> to_host(const T* p, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return std::vector<float>(h.begin(), h.end());
}

// max |got - want| / max(1, max |want|)
double rel_diff(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, top = 1.0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::isfinite(got[i]) ? std::fabs(static_cast<double>(got[i]) - want[i]) : INFINITY);
    top = std::max(top, std::fabs(static_cast<double>(want[i])));
  }
  return diff / top;
}

// The production backward first, then the wgmma configurations: dQ (the fp32
// accumulator), dK and dV within four 16-bit ulps of the largest value, then
// interleaved CUDA-event medians of the backward kernel alone (the
// preprocessing and the dQ conversion are the same for both).
template <class T, int D, class... Cfgs>
bool compare_bwd(int bh, int nq, int nk, int reps) {
  using Variant = std::pair<std::string, BwdLaunch<T>>;
  std::vector<Variant> variants{{"mma.sync BwdTile (production)", &launch_bwd_mma<T, D>}};
  (variants.push_back({describe_bwd<Cfgs>(), &launch_bwd_wgmma<T, D, Cfgs>}), ...);
  const size_t nq_el = static_cast<size_t>(bh) * nq * D, nk_el = static_cast<size_t>(bh) * nk * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Normal rnd;
  BwdBufs<T> b;
  auto fill = [&](T*& p, size_t n) {
    std::vector<T> h(n);
    for (auto& x : h) x = static_cast<T>(rnd());
    CHECK_CUDA(cudaMalloc(&p, n * sizeof(T)));
    CHECK_CUDA(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  };
  fill(b.q, nq_el);
  fill(b.k, nk_el);
  fill(b.v, nk_el);
  fill(b.dout, nq_el);
  CHECK_CUDA(cudaMalloc(&b.out, nq_el * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&b.dk, nk_el * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&b.dv, nk_el * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&b.lse, static_cast<size_t>(bh) * nq * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&b.delta, static_cast<size_t>(bh) * nq * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&b.dq, nq_el * sizeof(float)));
  launch_mma<T, D>(b.q, b.k, b.v, b.out, b.lse, bh, nq, nk, scale);
  const cudaError_t pre = launch_bwd_preprocess<T, D>(b.dout, b.out, nullptr, b.delta, nullptr, int64_t{bh} * nq, 0);
  CHECK_CUDA(pre);

  bool ok = true;
  std::vector<float> ref_dq, ref_dk, ref_dv;
  const double ulp = std::is_same_v<T, __half> ? 1.0 / 1024 : 1.0 / 128;
  for (size_t i = 0; i < variants.size(); ++i) {
    CHECK_CUDA(cudaMemset(b.dq, 0, nq_el * sizeof(float)));
    variants[i].second(b, bh, nq, nk, scale);
    finish_or_exit("backward " + variants[i].first);
    std::vector<float> dq = to_host(b.dq, nq_el), dk = to_host(b.dk, nk_el), dv = to_host(b.dv, nk_el);
    if (i == 0) {
      ref_dq = std::move(dq);
      ref_dk = std::move(dk);
      ref_dv = std::move(dv);
      continue;
    }
    const double e_dq = rel_diff(dq, ref_dq), e_dk = rel_diff(dk, ref_dk), e_dv = rel_diff(dv, ref_dv);
    if (!(e_dq <= 4 * ulp && e_dk <= 4 * ulp && e_dv <= 4 * ulp)) {
      std::printf("MISMATCH backward D=%d Nq=%d Nk=%d %s: relative max diff dQ %.3g, dK %.3g, dV %.3g\n", D, nq, nk,
                  variants[i].first.c_str(), e_dq, e_dk, e_dv);
      auto top = [](const std::vector<float>& x) {
        double m = 1.0;
        for (float e : x) m = std::max(m, static_cast<double>(std::fabs(e)));
        return m;
      };
      print_mismatches("dQ", dq.data(), ref_dq.data(), nq_el, nq, D, 4 * ulp * top(ref_dq));
      print_mismatches("dK", dk.data(), ref_dk.data(), nk_el, nk, D, 4 * ulp * top(ref_dk));
      print_mismatches("dV", dv.data(), ref_dv.data(), nk_el, nk, D, 4 * ulp * top(ref_dv));
      ok = false;
    }
  }

  std::vector<std::string> names;
  for (const auto& v : variants) names.push_back(v.first);
  char title[96];
  std::snprintf(title, sizeof(title), "backward %s D=%d B*H=%d Nq=%d Nk=%d",
                std::is_same_v<T, __half> ? "fp16" : "bf16", D, bh, nq, nk);
  const auto med = interleaved_medians(static_cast<int>(variants.size()), reps, 5,
                                       [&](int i) { variants[i].second(b, bh, nq, nk, scale); });
  report(title, names, med, 2.5 * 4.0 * bh * static_cast<double>(nq) * nk * D);
  for (void* p : {static_cast<void*>(b.q), static_cast<void*>(b.k), static_cast<void*>(b.v),
                  static_cast<void*>(b.dout), static_cast<void*>(b.out), static_cast<void*>(b.dk),
                  static_cast<void*>(b.dv), static_cast<void*>(b.lse), static_cast<void*>(b.delta),
                  static_cast<void*>(b.dq)})
    CHECK_CUDA(cudaFree(p));
  return ok;
}

}  // namespace

int main() {
  const cudaDeviceProp prop = print_device("mma.sync time / wgmma time (> 1: wgmma is faster)");
  if (prop.major != 9) {
    std::printf("needs compute capability 9.x (wgmma), this GPU is %d.%d\n", prop.major, prop.minor);
    return 2;
  }
  using bf16 = __nv_bfloat16;
  using namespace sgdm::cuda_attn::wg;
  bool ok = true;
  // Correctness first: key and query counts that are not multiples of the tiles, one and several key blocks.
  using D64 = WgConfig<64, 128, 2, 1>;
  using D64o = WgConfig<64, 128, 2, 1, true>;
  using D64n = WgConfig<64, 64, 2, 2>;
  using D64no = WgConfig<64, 64, 2, 1, true>;
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(3, 77, 77, 3);
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(5, 1000, 1000, 3);
  ok &= compare_wgmma<bf16, 32, WgConfig<32, 128, 2, 1>, WgConfig<32, 128, 2, 1, true>>(5, 1000, 1000, 3);
  ok &= compare_wgmma<bf16, 128, WgConfig<128, 128, 2, 1>, WgConfig<128, 128, 2, 1, true>>(5, 1000, 1000, 3);
  ok &= compare_wgmma<__half, 64, D64, D64o>(5, 1000, 1000, 3);
  // Cross-attention: queries and keys of different counts, a single partial key block and several.
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(4, 1000, 77, 3);
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(4, 33, 600, 3);
  // The backward, the same shapes.
  using B64 = WgBwdConfig<64, 2>;
  using B64one = WgBwdConfig<64, 1, 2>;
  using B32 = WgBwdConfig<32, 2>;
  using B128 = WgBwdConfig<128, 1, 2>;
  ok &= compare_bwd<bf16, 64, B64, B64one>(3, 77, 77, 3);
  ok &= compare_bwd<bf16, 64, B64, B64one>(5, 1000, 1000, 3);
  ok &= compare_bwd<bf16, 32, B32>(5, 1000, 1000, 3);
  ok &= compare_bwd<bf16, 128, B128>(5, 1000, 1000, 3);
  ok &= compare_bwd<__half, 64, B64>(5, 1000, 1000, 3);
  ok &= compare_bwd<__half, 128, B128>(5, 1000, 1000, 3);
  ok &= compare_bwd<bf16, 64, B64, B64one>(4, 1000, 77, 3);
  ok &= compare_bwd<bf16, 64, B64, B64one>(4, 33, 600, 3);
  ok &= compare_bwd<bf16, 128, B128>(4, 33, 600, 3);
  if (!ok) {
    std::printf("THE WGMMA KERNELS DISAGREE: no timings\n");
    return 1;
  }
  // The issue's shapes (bf16, B*H = 64, D = 64), then the ImageNet configs' D = 32 and D = 128.
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no, WgConfig<64, 128, 3, 1>>(64, 1024, 1024, 30);
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no, WgConfig<64, 128, 3, 1>>(64, 4096, 4096, 20);
  ok &= compare_wgmma<bf16, 32, WgConfig<32, 128, 2, 1>, WgConfig<32, 128, 2, 1, true>, WgConfig<32, 64, 2, 2>>(
      64, 4096, 4096, 15);
  ok &= compare_wgmma<bf16, 128, WgConfig<128, 128, 2, 1>, WgConfig<128, 128, 2, 1, true>, WgConfig<128, 64, 2, 1>>(
      64, 4096, 4096, 10);
  ok &= compare_bwd<bf16, 64, B64, B64one>(64, 1024, 1024, 10);
  ok &= compare_bwd<bf16, 64, B64, B64one>(64, 4096, 4096, 5);
  ok &= compare_bwd<bf16, 32, B32>(64, 4096, 4096, 5);
  ok &= compare_bwd<bf16, 128, B128>(64, 4096, 4096, 5);
  std::printf(ok ? "the wgmma kernels agree with the production kernels\n" : "THE WGMMA KERNELS DISAGREE\n");
  return ok ? 0 : 1;
}
