// Shared by the CUDA attention A/B programs (attention_tiles.cu,
// attention_wgmma.cu): the mma.sync forward's launcher, deterministic inputs
// rotated through more than the L2, an agreement check against a baseline
// kernel, and interleaved CUDA-event medians of 10 launches. Torch-free.
#pragma once

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention_fwd.cuh"

#define CHECK_CUDA(x)                                                                               \
  do {                                                                                              \
    const cudaError_t err_ = (x);                                                                   \
    if (err_ != cudaSuccess) {                                                                      \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__);        \
      std::exit(2);                                                                                 \
    }                                                                                               \
  } while (0)

namespace sgdm_ab {

// Waits for the work queued so far, at most `seconds`: a kernel that never ends (a barrier or a
// wait that no one completes) ends the program with exit code 3 and the name of the kernel, in a
// few seconds instead of at the caller's time limit. Used before a kernel's first result is read.
inline void finish_or_exit(const std::string& what, double seconds = 20.0) {
  cudaEvent_t done;
  CHECK_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  CHECK_CUDA(cudaEventRecord(done));
  const auto start = std::chrono::steady_clock::now();
  cudaError_t state;
  while ((state = cudaEventQuery(done)) == cudaErrorNotReady) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > seconds) {
      std::printf("HANG: %s did not finish within %.0f s\n", what.c_str(), seconds);
      std::fflush(stdout);
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  CHECK_CUDA(state);
  CHECK_CUDA(cudaEventDestroy(done));
}

constexpr float kLog2e = 1.4426950408889634f;

// Deterministic standard normals (xorshift64 + Box-Muller), so runs compare.
struct Normal {
  uint64_t s = 88172645463325252ull;
  double uniform() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return (static_cast<double>(s >> 11) + 0.5) / 9007199254740992.0;
  }
  float operator()() {
    return static_cast<float>(std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform()));
  }
};

template <class T>
struct Inputs {
  std::vector<T*> buf;  // sets x (q, k, v, out)
  std::vector<float*> lse;
  int sets = 0;
  Inputs(int bh, int n, int d, Normal& rnd, double min_bytes) {  // n: the larger of Nq and Nk
    const size_t elems = static_cast<size_t>(bh) * n * d;
    sets = std::max(1, static_cast<int>(min_bytes / (4.0 * elems * sizeof(T))) + 1);
    std::vector<T> h(elems);
    for (int s = 0; s < sets; ++s) {
      for (int t = 0; t < 4; ++t) {
        for (auto& x : h) x = static_cast<T>(rnd());
        T* p = nullptr;
        CHECK_CUDA(cudaMalloc(&p, elems * sizeof(T)));
        CHECK_CUDA(cudaMemcpy(p, h.data(), elems * sizeof(T), cudaMemcpyHostToDevice));
        buf.push_back(p);
      }
      float* l = nullptr;
      CHECK_CUDA(cudaMalloc(&l, static_cast<size_t>(bh) * n * sizeof(float)));
      lse.push_back(l);
    }
  }
  ~Inputs() {
    for (T* p : buf) cudaFree(p);
    for (float* p : lse) cudaFree(p);
  }
};

// Prints the GPU and what the ratios mean; returns its properties.
inline cudaDeviceProp print_device(const char* ratio) {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; ratio = %s\n", prop.name, prop.multiProcessorCount, ratio);
  return prop;
}

// For a disagreement: where the first `show` elements off by more than tol
// sit, as (B*H index, row, column) of [B*H][rows][d] tensors, with both
// values, and how many there are. A pattern (every other 8 columns, one row
// in 8) points at a fragment or swizzle layout.
template <class A, class B>
void print_mismatches(const char* what, const A* got, const B* want, size_t n, int rows, int d, double tol,
                      int show = 6) {
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<float>(got[i]), w = static_cast<float>(want[i]);
    if (std::fabs(g - w) <= tol) continue;
    if (++count <= static_cast<size_t>(show))
      std::printf("    %s [%zu, %zu, %zu]: %.5g, want %.5g\n", what, i / (static_cast<size_t>(rows) * d),
                  i / d % rows, i % d, g, w);
  }
  std::printf("    %s: %zu of %zu elements off by more than %.3g\n", what, count, n, tol);
}

// Medians (ms per call) of kV variants, run(i) launching variant i once:
// warm-up, then reps rounds in rotating order, each timing `calls` launches
// with CUDA events.
template <class Run>
std::vector<double> interleaved_medians(int kV, int reps, int calls, Run&& run) {
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<std::vector<float>> t(kV);
  for (int w = 0; w < 3; ++w)
    for (int i = 0; i < kV; ++i) run(i);
  for (int r = 0; r < reps; ++r)
    for (int j = 0; j < kV; ++j) {
      const int which = (r + j) % kV;
      CHECK_CUDA(cudaEventRecord(e0));
      for (int c = 0; c < calls; ++c) run(which);
      CHECK_CUDA(cudaEventRecord(e1));
      CHECK_CUDA(cudaEventSynchronize(e1));
      float ms = 0.0f;
      CHECK_CUDA(cudaEventElapsedTime(&ms, e0, e1));
      t[which].push_back(ms / static_cast<float>(calls));
    }
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  std::vector<double> med(kV);
  for (int i = 0; i < kV; ++i) {
    std::sort(t[i].begin(), t[i].end());
    med[i] = t[i][t[i].size() / 2];
  }
  return med;
}

// One line per variant: median, TFLOP/s for `flops` per call, ratio to the first (the baseline).
inline void report(const char* title, const std::vector<std::string>& names, const std::vector<double>& med,
                   double flops) {
  std::printf("%s\n", title);
  for (size_t i = 0; i < names.size(); ++i)
    std::printf("  %-56s %8.4f ms %6.0f TFLOP/s %6.3fx%s\n", names[i].c_str(), med[i], flops / med[i] / 1e9,
                med[0] / med[i], i == 0 ? "  (baseline)" : "");
}

// The production mma.sync forward (attention_fwd.cuh) with tile configuration Cfg.
template <class T, int D, class Cfg = sgdm::cuda_attn::FwdTile<D>>
void launch_mma(const T* q, const T* k, const T* v, T* o, float* lse, int bh, int nq, int nk, float scale) {
  using sgdm::cuda_attn::attention_fwd_mma;
  constexpr int smem = Cfg::template smem_bytes<T>();
  CHECK_CUDA(cudaFuncSetAttribute(&attention_fwd_mma<T, D, Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  attention_fwd_mma<T, D, Cfg><<<dim3((nq + Cfg::kM - 1) / Cfg::kM, bh), Cfg::kThreads, smem>>>(
      q, k, v, o, lse, nq, nk, scale * kLog2e);
  CHECK_CUDA(cudaGetLastError());
}

// A forward launcher: (q, k, v, out, lse, B*H, Nq, Nk, scale).
template <class T>
using FwdLaunch = void (*)(const T*, const T*, const T*, T*, float*, int, int, int, float);
template <class T>
struct FwdVariant {
  std::string name;
  FwdLaunch<T> fn;
};

// variants[0] is the baseline: every other one must give its output (max
// |difference| within two 16-bit ulps of the largest output, lse within 1e-5
// relative) and is timed against it. Prints one line per variant; false when
// one disagrees.
template <class T, int D>
bool compare(const std::vector<FwdVariant<T>>& variants, int bh, int nq, int nk, int reps) {
  const int kV = static_cast<int>(variants.size());
  Normal rnd;
  Inputs<T> in(bh, std::max(nq, nk), D, rnd, 150e6);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const size_t elems = static_cast<size_t>(bh) * nq * D;

  // Agreement with the baseline on input set 0.
  bool ok = true;
  std::vector<T> ref(elems), got(elems);
  std::vector<float> ref_lse(static_cast<size_t>(bh) * nq), got_lse(ref_lse.size());
  for (int i = 0; i < kV; ++i) {
    variants[i].fn(in.buf[0], in.buf[1], in.buf[2], in.buf[3], in.lse[0], bh, nq, nk, scale);
    finish_or_exit("forward " + variants[i].name);
    auto& o = i == 0 ? ref : got;
    auto& l = i == 0 ? ref_lse : got_lse;
    CHECK_CUDA(cudaMemcpy(o.data(), in.buf[3], elems * sizeof(T), cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(l.data(), in.lse[0], l.size() * sizeof(float), cudaMemcpyDeviceToHost));
    if (i == 0) continue;
    double diff = 0.0, top = 0.0, ldiff = 0.0;
    for (size_t e = 0; e < elems; ++e) {
      const double a = static_cast<float>(ref[e]), b = static_cast<float>(got[e]);
      diff = std::max(diff, std::isfinite(b) ? std::fabs(a - b) : INFINITY);
      top = std::max(top, std::fabs(a));
    }
    for (size_t e = 0; e < ref_lse.size(); ++e)
      ldiff = std::max(ldiff, std::fabs(static_cast<double>(ref_lse[e]) - got_lse[e]) /
                                  std::max(1.0, std::fabs(static_cast<double>(ref_lse[e]))));
    const double ulp = std::is_same_v<T, __half> ? 1.0 / 1024 : 1.0 / 128;  // of values in [1, 2)
    const bool agree = diff <= 2.0 * ulp * std::max(1.0, top) && ldiff <= 1e-5;
    if (!agree) {
      std::printf("MISMATCH D=%d Nq=%d Nk=%d %s: max |out diff| %.3g (max |out| %.3g), lse rel diff %.3g\n", D, nq, nk,
                  variants[i].name.c_str(), diff, top, ldiff);
      print_mismatches("out", got.data(), ref.data(), elems, nq, D, 2.0 * ulp * std::max(1.0, top));
      print_mismatches("lse", got_lse.data(), ref_lse.data(), ref_lse.size(), nq, 1, 1e-5 * std::max(1.0, top));
      ok = false;
    }
  }

  int it = 0;
  auto run = [&](int which) {
    const int s = it++ % in.sets;
    T* const* b = &in.buf[4 * s];
    variants[which].fn(b[0], b[1], b[2], b[3], in.lse[s], bh, nq, nk, scale);
  };
  std::vector<std::string> names;
  for (const auto& v : variants) names.push_back(v.name);
  char title[96];
  std::snprintf(title, sizeof(title), "%s D=%d B*H=%d Nq=%d Nk=%d", std::is_same_v<T, __half> ? "fp16" : "bf16", D,
                bh, nq, nk);
  report(title, names, interleaved_medians(kV, reps, 10, run), 4.0 * bh * static_cast<double>(nq) * nk * D);
  return ok;
}

}  // namespace sgdm_ab
