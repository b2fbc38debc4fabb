// The Hopper wgmma attention kernels, forward and backward, run on the CPU
// (wgmma_emulation.h) against a float64 reference: the configurations the
// extension uses and the others the GPU harness times, on shapes with partial
// query and key blocks. Exits 1 on a disagreement. Built with a host
// compiler by tests/ops/test_attention_ab_programs.py:
//   g++ -std=c++20 -O2 -fno-strict-aliasing -pthread -I/usr/local/cuda/include -Icsrc/include
//       -Icsrc/cuda tests/ops/cuda_host/wgmma_emulator.cpp -o wgmma_emulator   (one command)
// `wgmma_emulator --sweep` runs a larger grid of sizes instead (not in the test suite: minutes).
#include "wgmma_emulation.h"  // first: it replaces the PTX wrappers

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attention_wgmma.cuh"
#include "attention_wgmma_bwd.cuh"

using namespace sgdm::cuda_attn;

namespace {

int failures = 0;

// max |got - want| over max(1, max |want|)
double rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  double diff = 0.0, top = 1.0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff = std::max(diff, std::isfinite(got[i]) ? std::fabs(got[i] - want[i]) : INFINITY);
    top = std::max(top, std::fabs(want[i]));
  }
  return diff / top;
}

void expect(const std::string& what, double err, double tol) {
  const bool ok = err <= tol;
  failures += !ok;
  std::printf("  %-58s max rel err %.2e (tol %.0e)%s\n", what.c_str(), err, tol, ok ? "" : "  MISMATCH");
}

// Every wgmma operand read since the last call was published by a fence.proxy.async.
void expect_fenced() {
  const long unfenced = sgdm_emu::unpublished_reads.exchange(0);
  if (unfenced == 0) return;
  ++failures;
  std::printf("  UNFENCED: %ld wgmma operand elements were written without a fence.proxy.async before the read\n",
              unfenced);
}

// Inputs rounded to T, the float64 reference of the forward (out, lse) and of the backward.
template <class T>
struct Problem {
  int bh, nq, nk, d;
  double scale;
  std::vector<T> q, k, v, dout;
  std::vector<double> out, lse, dq, dk, dv;

  Problem(int bh_, int nq_, int nk_, int d_, unsigned seed) : bh(bh_), nq(nq_), nk(nk_), d(d_) {
    scale = 1.0 / std::sqrt(static_cast<double>(d));
    std::mt19937 gen(seed);
    std::normal_distribution<float> normal;
    auto fill = [&](std::vector<T>& x, size_t n) {
      x.resize(n);
      for (auto& e : x) e = static_cast<T>(normal(gen));
    };
    fill(q, size_t(bh) * nq * d);
    fill(k, size_t(bh) * nk * d);
    fill(v, size_t(bh) * nk * d);
    fill(dout, size_t(bh) * nq * d);
    out.assign(q.size(), 0.0);
    lse.assign(size_t(bh) * nq, 0.0);
    dq.assign(q.size(), 0.0);
    dk.assign(k.size(), 0.0);
    dv.assign(v.size(), 0.0);
    auto at = [&](const std::vector<T>& x, int b, int row, int col, int rows) {
      return static_cast<double>(static_cast<float>(x[(size_t(b) * rows + row) * d + col]));
    };
    std::vector<double> p(nk), dp(nk);
    for (int b = 0; b < bh; ++b)
      for (int i = 0; i < nq; ++i) {
        double m = -INFINITY;
        for (int j = 0; j < nk; ++j) {
          double s = 0.0;
          for (int c = 0; c < d; ++c) s += at(q, b, i, c, nq) * at(k, b, j, c, nk);
          p[j] = s * scale;
          m = std::max(m, p[j]);
        }
        double l = 0.0;
        for (int j = 0; j < nk; ++j) l += (p[j] = std::exp(p[j] - m));
        for (int j = 0; j < nk; ++j) p[j] /= l;
        lse[size_t(b) * nq + i] = m + std::log(l);
        double delta = 0.0;
        for (int j = 0; j < nk; ++j) {
          dp[j] = 0.0;
          for (int c = 0; c < d; ++c) {
            out[(size_t(b) * nq + i) * d + c] += p[j] * at(v, b, j, c, nk);
            dp[j] += at(dout, b, i, c, nq) * at(v, b, j, c, nk);
          }
          delta += p[j] * dp[j];
        }
        for (int j = 0; j < nk; ++j) {
          const double ds = p[j] * (dp[j] - delta);
          for (int c = 0; c < d; ++c) {
            dv[(size_t(b) * nk + j) * d + c] += p[j] * at(dout, b, i, c, nq);
            dq[(size_t(b) * nq + i) * d + c] += scale * ds * at(k, b, j, c, nk);
            dk[(size_t(b) * nk + j) * d + c] += scale * ds * at(q, b, i, c, nq);
          }
        }
      }
  }
};

template <class T>
std::vector<float> floats(const std::vector<T>& x) {
  return std::vector<float>(x.begin(), x.end());
}

template <class T>
const char* type_name() {
  return std::is_same_v<T, __half> ? "fp16" : "bf16";
}

// The forward kernel: out and lse (natural log) of the problem.
template <class T, int D, class Cfg>
void forward(const Problem<T>& pr, std::vector<T>& out, std::vector<float>& lse) {
  out.assign(pr.q.size(), T(0.0f));
  lse.assign(size_t(pr.bh) * pr.nq, 0.0f);
  const unsigned grid_x = static_cast<unsigned>((pr.nq + Cfg::kM - 1) / Cfg::kM);
  sgdm_emu::launch(grid_x, static_cast<unsigned>(pr.bh), Cfg::kThreads, [&] {
    wg::attention_fwd_wgmma<T, D, Cfg>(pr.q.data(), pr.k.data(), pr.v.data(), out.data(), lse.data(), pr.nq, pr.nk,
                                       fwd_scale_log2(static_cast<float>(pr.scale)));
  });
}

template <class T, int D, class Cfg>
void check_forward(int bh, int nq, int nk, unsigned seed) {
  const Problem<T> pr(bh, nq, nk, D, seed);
  std::vector<T> out;
  std::vector<float> lse;
  forward<T, D, Cfg>(pr, out, lse);
  char what[160];
  std::snprintf(what, sizeof(what), "forward %s D=%d keys/block %d wg %d%s Nq=%d Nk=%d: out", type_name<T>(), D,
                Cfg::kN, Cfg::kWG, Cfg::kOverlap ? " overlap" : "", nq, nk);
  const double tol = std::is_same_v<T, __half> ? 1e-3 : 5e-3;
  expect(what, rel_err(floats(out), pr.out), tol);
  expect("  lse", rel_err(lse, pr.lse), 1e-4);
  expect_fenced();
}

// The backward kernel, fed by the emulated forward (with the production forward's
// wgmma twin, the extension's configuration) as the extension feeds it.
template <class T, int D, class Cfg>
void check_backward(int bh, int nq, int nk, unsigned seed) {
  const Problem<T> pr(bh, nq, nk, D, seed);
  std::vector<T> out;
  std::vector<float> lse;
  forward<T, D, wg::WgConfig<D, 128, 2, 1, true>>(pr, out, lse);
  std::vector<float> delta(size_t(bh) * nq), dq_accum(pr.q.size(), 0.0f);  // attention_bwd_preprocess
  for (size_t r = 0; r < delta.size(); ++r) {
    float s = 0.0f;
    for (int c = 0; c < D; ++c) s += static_cast<float>(pr.dout[r * D + c]) * static_cast<float>(out[r * D + c]);
    delta[r] = s;
  }
  std::vector<T> dk(pr.k.size(), T(0.0f)), dv(pr.v.size(), T(0.0f));
  const float scale = static_cast<float>(pr.scale);
  sgdm_emu::launch(static_cast<unsigned>((nk + Cfg::kN - 1) / Cfg::kN), static_cast<unsigned>(bh), Cfg::kThreads, [&] {
    wg::attention_bwd_wgmma<T, D, Cfg>(pr.q.data(), pr.k.data(), pr.v.data(), pr.dout.data(), lse.data(),
                                       delta.data(), dq_accum.data(), dk.data(), dv.data(), nq, nk, scale);
  });
  for (auto& x : dq_accum) x *= scale;  // attention_dq_convert
  char what[160];
  std::snprintf(what, sizeof(what), "backward %s D=%d warpgroups %d%s Nq=%d Nk=%d: dQ", type_name<T>(), D, Cfg::kWG,
                Cfg::kRegisterLean ? " lean" : "", nq, nk);
  const double tol = std::is_same_v<T, __half> ? 2e-3 : 1e-2;
  expect(what, rel_err(dq_accum, pr.dq), tol);
  expect("  dK", rel_err(floats(dk), pr.dk), tol);
  expect("  dV", rel_err(floats(dv), pr.dv), tol);
  expect_fenced();
}

void run_all();
void run_sweep();
void (*run)() = run_all;

}  // namespace

// wgmma_emulator: the test's set. wgmma_emulator --sweep: every (Nq, Nk) of two grids of
// block-edge sizes through the extension's configurations (about 2 minutes on 2 cores).
int main(int argc, char** argv) {
  if (argc > 1) {
    if (argc != 2 || std::string(argv[1]) != "--sweep") {
      std::fprintf(stderr, "usage: %s [--sweep]\n", argv[0]);
      return 2;
    }
    run = run_sweep;
  }
  // Each wgmma completing at issue, then at the wait that covers it; then with
  // each cp.async also landing at its wait, not at issue.
  const struct {
    bool deferred, late_copies;
    const char* what;
  } modes[] = {{false, false, "wgmma completing at issue, copies landing at issue"},
               {true, false, "wgmma completing at its wait, copies landing at issue"},
               {true, true, "wgmma completing at its wait, copies landing at theirs"}};
  for (const auto& mode : modes) {
    sgdm_emu::deferred = mode.deferred;
    sgdm_emu::late_copies = mode.late_copies;
    std::printf("%s:\n", mode.what);
    run();
  }
  if (failures) {
    std::printf("%d mismatches\n", failures);
    return 1;
  }
  std::printf("the wgmma kernels compute attention and its gradients (CPU emulation)\n");
  return 0;
}

namespace {

void run_all() {
  using bf16 = __nv_bfloat16;
  using wg::WgBwdConfig;
  using wg::WgConfig;
  // Forward: the extension's configurations (attention_hopper.cu: 64-key blocks and 2 CTAs an SM
  // for D = 32 and 64, 128-key blocks on grids under one wave, 128-key blocks with the overlap
  // for D = 128) and the harness's others; several key blocks with a partial last one, partial
  // query tiles.
  check_forward<bf16, 64, WgConfig<64, 128, 2, 1, true>>(2, 130, 300, 1);
  check_forward<bf16, 64, WgConfig<64, 64, 2, 2>>(1, 77, 150, 2);
  check_forward<__half, 64, WgConfig<64, 64, 2, 2>>(2, 130, 200, 16);
  check_forward<bf16, 32, WgConfig<32, 64, 2, 2>>(1, 130, 260, 17);
  check_forward<bf16, 64, WgConfig<64, 128, 2, 1>>(1, 130, 300, 18);
  check_forward<__half, 32, WgConfig<32, 128, 2, 1>>(1, 77, 150, 19);
  check_forward<bf16, 64, WgConfig<64, 128, 2, 1, true>>(1, 33, 77, 3);
  check_forward<bf16, 32, WgConfig<32, 128, 2, 1, true>>(1, 130, 260, 4);
  check_forward<bf16, 128, WgConfig<128, 128, 2, 1, true>>(1, 100, 300, 5);
  check_forward<__half, 64, WgConfig<64, 128, 2, 1, true>>(1, 130, 200, 6);
  check_forward<bf16, 64, WgConfig<64, 128, 3, 1>>(1, 200, 260, 13);  // the harness's others
  check_forward<bf16, 128, WgConfig<128, 64, 2, 1>>(1, 130, 150, 14);
  check_forward<bf16, 32, WgConfig<32, 64, 2, 2>>(1, 64, 1, 15);  // a single key
  // Backward: the extension's configurations and the one-warpgroup D = 64 variant; three
  // query blocks (both buffers, a partial last one), a partial key block.
  check_backward<bf16, 64, WgBwdConfig<64, 2>>(2, 130, 150, 7);
  check_backward<bf16, 64, WgBwdConfig<64, 1, 2>>(1, 130, 100, 8);
  check_backward<bf16, 32, WgBwdConfig<32, 2>>(1, 150, 130, 9);
  check_backward<bf16, 128, WgBwdConfig<128, 1, 2>>(1, 130, 100, 10);
  check_backward<__half, 64, WgBwdConfig<64, 2>>(1, 70, 200, 11);
  check_backward<__half, 128, WgBwdConfig<128, 1, 2>>(1, 64, 64, 12);
  check_backward<__half, 64, WgBwdConfig<64, 1, 2>>(1, 70, 200, 20);
}

// Sizes around the block edges (64 queries a warpgroup, 64 or 128 keys a block): D = 64 bf16 with
// the extension's forward and backward at every pair, the other head dims and fp16 in turn.
void run_sweep() {
  using bf16 = __nv_bfloat16;
  using wg::WgBwdConfig;
  using wg::WgConfig;
  const int nqs[] = {1, 63, 64, 65, 128, 129, 191};
  const int nks[] = {1, 2, 63, 64, 127, 128, 129, 255, 256, 257, 385};
  unsigned seed = 100;
  for (const int nq : nqs)
    for (const int nk : nks) {
      ++seed;
      check_forward<bf16, 64, WgConfig<64, 64, 2, 2>>(1, nq, nk, seed);
      check_backward<bf16, 64, WgBwdConfig<64, 2>>(1, nq, nk, seed);
      if (seed % 3 == 0) {
        check_forward<__half, 32, WgConfig<32, 128, 2, 1, true>>(1, nq, nk, seed);
        check_backward<__half, 128, WgBwdConfig<128, 1, 2>>(1, nq, nk, seed);
      } else if (seed % 3 == 1) {
        check_forward<bf16, 128, WgConfig<128, 128, 2, 1, true>>(1, nq, nk, seed);
        check_backward<bf16, 32, WgBwdConfig<32, 2>>(1, nq, nk, seed);
      } else {
        check_forward<bf16, 64, WgConfig<64, 128, 2, 1>>(1, nq, nk, seed);
        check_forward<bf16, 32, WgConfig<32, 64, 2, 2>>(1, nq, nk, seed);
        check_backward<bf16, 64, WgBwdConfig<64, 1, 2>>(1, nq, nk, seed);
      }
    }
}

}  // namespace
