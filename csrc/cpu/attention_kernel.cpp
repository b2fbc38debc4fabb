// Flash attention on the CPU, compiled once per ISA (see dispatch.h).
//
// Forward: every (batch*head, query block) is one task; it streams the key
// blocks, computes S = Q K^T with a register-blocked micro-kernel (K^T
// repacked per head into contiguous panels, see pack_panels), updates
// the online softmax state per row (sgdm/attention_math.h) and accumulates
// P V. Backward: every (batch*head, key split) is one task that owns dK and
// dV of its key blocks and adds its share of dQ to a private partial buffer,
// so no two threads write the same memory. Nothing N x N is stored.
// GCC 12 flags ATen's AVX-512 exp/max wrappers and _mm512_reduce_add_ps as
// (maybe-)uninitialized (_mm512_undefined_ps, _mm256_undefined_pd); false
// positives that would bury real warnings.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "attention_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/vec_io.h"
#include "dispatch.h"
#include "sgdm/attention_math.h"

namespace sgdm::cpu::CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// Register tile of the micro-kernel: kMr rows x kNv vectors of C live in
// registers (6 x 4 zmm on AVX-512, 6 x 2 ymm on AVX2: 24 / 12 accumulators).
constexpr int kMr = 6;
constexpr int kNv = kW >= 16 ? 4 : 2;
// Columns of B one row strip of the micro-kernel covers (a panel).
constexpr int64_t kPanel = kNv * kW;

constexpr int64_t kFwdBlockQ = 64;
constexpr int64_t kFwdBlockK = 256;
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBwdBlockK = kAttentionBwdBlockK;
// Row strides of the score buffers: the block width plus one 64-byte line, so
// their rows do not all map to the same L1 sets.
constexpr int64_t kFwdLds = kFwdBlockK + 16;
constexpr int64_t kBwdLds = kBwdBlockK + 16;

// Operand views of C[m, n] (+)= A[m, k] B[k, n]: A is read element-wise with
// any strides (so A^T costs nothing), B and C row by row, n a multiple of kW.
struct MatA {
  const float* p;
  int64_t row_stride, col_stride;
};
struct MatB {
  const float* p;
  int64_t ld;
  // 0: the columns of a row are contiguous. Otherwise B is stored in panels
  // of kPanel columns, each a [k, ld] block, panel_stride floats apart.
  int64_t panel_stride = 0;
};
struct MatC {
  float* p;
  int64_t ld;
};

// With `rmax`, also folds the tile's rows into rmax[r * kW .. r * kW + kW),
// a running elementwise maximum (the forward's row maximum, without another
// pass over the scores).
template <int R, int V>
void gemm_tile(int64_t kdim, MatA a, MatB b, MatC c, bool accumulate, float* rmax) {
  Vec acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? Vec::loadu(c.p + r * c.ld + v * kW) : Vec(0.0f);
  for (int64_t p = 0; p < kdim; ++p) {
    Vec bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bv[v] = Vec::loadu(b.p + p * b.ld + v * kW);
    const float* ap = a.p + p * a.col_stride;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec av(ap[r * a.row_stride]);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v].store(c.p + r * c.ld + v * kW);
  if (rmax == nullptr) return;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Vec m = Vec::loadu(rmax + r * kW);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) m = at::vec::maximum(m, acc[r][v]);
    m.store(rmax + r * kW);
  }
}

// One panel of V vectors of columns: every row strip of A against the same
// kdim x (V kW) panel of B, which therefore stays in L1.
template <int V>
void gemm_panel(int64_t m, int64_t kdim, MatA a, MatB b, MatC c, bool accumulate, float* rmax) {
  int64_t i = 0;
  for (; i + kMr <= m; i += kMr)
    gemm_tile<kMr, V>(kdim, {a.p + i * a.row_stride, a.row_stride, a.col_stride}, b, {c.p + i * c.ld, c.ld},
                      accumulate, rmax == nullptr ? nullptr : rmax + i * kW);
  const MatA at{a.p + i * a.row_stride, a.row_stride, a.col_stride};
  const MatC ct{c.p + i * c.ld, c.ld};
  float* rt = rmax == nullptr ? nullptr : rmax + i * kW;
  switch (m - i) {
    case 5: gemm_tile<5, V>(kdim, at, b, ct, accumulate, rt); break;
    case 4: gemm_tile<4, V>(kdim, at, b, ct, accumulate, rt); break;
    case 3: gemm_tile<3, V>(kdim, at, b, ct, accumulate, rt); break;
    case 2: gemm_tile<2, V>(kdim, at, b, ct, accumulate, rt); break;
    case 1: gemm_tile<1, V>(kdim, at, b, ct, accumulate, rt); break;
    default: break;
  }
}

// Depth of the chunks gemm walks kdim in: a panel of B is then at most
// 64 x 64 floats (16 KiB), reused from L1 by every row strip of A. Walking all
// of kdim at once streamed the forward's 256-key blocks of K^T and V (64 KiB
// each at d = 64, more than L1) from L2 once per strip. A chunk stores its
// partial sums in C and the next reloads them, so the bits are the same.
constexpr int64_t kGemmDepth = 64;

// C[m, n] = A B (or += when accumulate); n must be a multiple of kW. With
// `rmax` ([m, kW]), every row i of C is also folded into rmax[i * kW ..).
void gemm(int64_t m, int64_t n, int64_t kdim, MatA a, MatB b, MatC c, bool accumulate,
          float* rmax = nullptr) {
  for (int64_t p0 = 0; p0 < kdim; p0 += kGemmDepth) {
    const int64_t kc = std::min(kGemmDepth, kdim - p0);
    const MatA ak{a.p + p0 * a.col_stride, a.row_stride, a.col_stride};
    const float* bk = b.p + p0 * b.ld;
    const auto col = [&](int64_t j) -> MatB {  // B from column j on
      return {b.panel_stride == 0 ? bk + j : bk + j / kPanel * b.panel_stride + j % kPanel, b.ld};
    };
    const bool acc = accumulate || p0 > 0;
    float* rm = p0 + kc == kdim ? rmax : nullptr;  // the finished sums only
    int64_t j = 0;
    for (; j + kPanel <= n; j += kPanel) gemm_panel<kNv>(m, kc, ak, col(j), {c.p + j, c.ld}, acc, rm);
    // Two-vector panels before single ones: d = 32 on AVX-512 (two vectors)
    // ran one-vector tiles, 6 FMAs to 7 loads, and the forward took ~15% less
    // time with 6 x 2 tiles (and no longer depended on where the buffers lay).
    if constexpr (kNv > 2) {
      for (; j + 2 * kW <= n; j += 2 * kW) gemm_panel<2>(m, kc, ak, col(j), {c.p + j, c.ld}, acc, rm);
    }
    for (; j < n; j += kW) gemm_panel<1>(m, kc, ak, col(j), {c.p + j, c.ld}, acc, rm);
  }
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch floats starting on a 64-byte line. std::vector's data is only
// 16-byte aligned (a large block comes from mmap at a page plus 16 bytes),
// and then the micro-kernels' whole-vector loads and stores cross cache lines:
// aligning the forward's buffers took ~4% off its time (AVX-512, N = 1024).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n) : buf_(static_cast<size_t>(n) + kSlack) {}
  float* data() {
    const auto addr = reinterpret_cast<std::uintptr_t>(buf_.data());
    return buf_.data() + (kAlign - addr % kAlign) % kAlign / sizeof(float);
  }

 private:
  static constexpr std::uintptr_t kAlign = 64;
  static constexpr int64_t kSlack = kAlign / sizeof(float) - 1;
  std::vector<float> buf_;
};

float row_max(const float* s, int64_t n) {
  Vec acc(attn::neg_infinity());
  int64_t j = 0;
  for (; j + kW <= n; j += kW) acc = at::vec::maximum(acc, Vec::loadu(s + j));
  float m = hmax(acc);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// exp(x) for x <= 0 (scores minus their row maximum or their lse) as 2^t,
// t = x log2 e: 2^floor(t) 2^f with f = t - floor(t) in [0, 1) and 2^f by a
// degree-5 minimax polynomial with p(0) = 1, so exp(0) = 1 exactly (relative
// error 1.4e-7 in fp32; exp_u20: ~2e-6, ~20 instructions). AVX-512: vreduceps
// gives f and vscalefps applies floor(t), 10 instructions with the shift;
// AVX2 builds 2^floor(t) from its exponent bits, 14. The lower clamp keeps
// -inf from making a NaN (f = -inf + inf) and gives 0 there; a NaN passes
// through (max returns its second operand). Against the previous AVX-512 exp
// (round to nearest, degree-6 Taylor) the softmax pass took ~20% less time.
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 exp2_fraction(__m512 f) {
  __m512 p = _mm512_set1_ps(1.8671324942e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.0170251206e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5799916387e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4016444385e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9315129519e-01f));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}

inline Vec exp_fast(Vec x) {
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-200.0f), _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_fraction(f), t);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 exp2_fraction(__m256 f) {
  __m256 p = _mm256_set1_ps(1.8671324942e-03f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.0170251206e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5799916387e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4016444385e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9315129519e-01f));
  return _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
}

// Below t = -126 the result is 0 (the exponent field of 2^-127 is 0).
inline Vec exp_fast(Vec x) {
  const __m256 t = _mm256_max_ps(_mm256_set1_ps(-127.0f), _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)));
  const __m256 n = _mm256_floor_ps(t);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(exp2_fraction(_mm256_sub_ps(t, n)), _mm256_castsi256_ps(e));
}
#else
// ATen's fast polynomial exp (about 2e-6 relative error, below fp32
// attention noise).
inline Vec exp_fast(Vec x) { return x.exp_u20(); }
#endif

// s[j] = exp(s[j] - shift) for j < n; returns the sum.
float exp_shift_sum(float* s, int64_t n, float shift) {
  const Vec vshift(shift);
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec e = exp_fast(Vec::loadu(s + j) - vshift);
    e.store(s + j);
    acc = acc + e;
  }
  float sum = hsum(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

void scale_row(float* x, int64_t n, float alpha) {
  at::vec::map([alpha](Vec v) { return v * Vec(alpha); }, x, x, n);
}

// K^T of head bh ([d, ldk]) in panels of kPanel keys: panel p, keys
// [p kPanel, (p + 1) kPanel), is a contiguous [d, kPanel] block at
// out + p d kPanel, zero beyond ldk. A micro-kernel row strip then reads
// 16 KiB of consecutive memory (d = 64, AVX-512) instead of d rows one page
// apart (ldk = 1072 floats at N = 1024): a forward block took ~12% less
// time at N = 1024 and ~8% less at N = 4096 (d = 64, one thread). Same bits:
// gemm does the same arithmetic on either layout.
void pack_panels(const AttentionFwdArgs& a, int64_t bh, float* out) {
  const int64_t d = a.d, panels = (a.nk + kPanel - 1) / kPanel;
  const float* kt = a.kt + bh * d * a.ldk;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t j0 = p * kPanel, w = std::min(kPanel, a.ldk - j0);
    for (int64_t c = 0; c < d; ++c) {
      float* o = out + (p * d + c) * kPanel;
      std::copy(kt + c * a.ldk + j0, kt + c * a.ldk + j0 + w, o);
      std::fill(o + w, o + kPanel, 0.0f);
    }
  }
}

// Keys above which the forward packs K^T into panels: one key block is read
// from the glue's layout (no copy for small calls; measured within noise at
// 256 keys).
constexpr int64_t kFwdPanelKeys = kFwdBlockK;

// Bytes of a head's K and V above which a forward task takes kFwdGroup query
// blocks: they then no longer stay in L2 (2 MiB a core here) from one query
// block to the next, and each key block read serves three query blocks. At
// N = 4096, d = 64 (2 MiB) that took ~4% off the forward; at N <= 2048 it
// made no difference, and single blocks keep more tasks for the threads.
constexpr int64_t kFwdGroupBytes = int64_t{1} << 20;
constexpr int64_t kFwdGroup = 3;

// Query rows of one forward task.
int64_t forward_task_rows(const AttentionFwdArgs& a) {
  const int64_t kv_bytes = 2 * a.nk * a.d * static_cast<int64_t>(sizeof(float));
  return kv_bytes > kFwdGroupBytes ? kFwdGroup * kFwdBlockQ : kFwdBlockQ;
}

// Query rows [i0, i0 + mq) of the forward against every key block, in query
// blocks of at most kFwdBlockQ rows (s and rmax hold one block; acc and rows
// all mq rows); kt is head bh's K^T, in panels or as [d, ldk].
void forward_block(const AttentionFwdArgs& a, MatB kt, int64_t bh, int64_t i0, int64_t mq, float* s,
                   float* acc, float* rmax, attn::OnlineRow* rows) {
  const int64_t d = a.d, lds = kFwdLds;
  const float* q = a.q + (bh * a.nq + i0) * d;
  for (int64_t r = 0; r < mq; ++r) rows[r] = attn::online_init();
  std::fill(acc, acc + mq * d, 0.0f);
  for (int64_t j0 = 0; j0 < a.nk; j0 += kFwdBlockK) {
    const int64_t nkb = std::min(kFwdBlockK, a.nk - j0);
    // A block of whole vectors has no padding columns: gemm finds its row
    // maxima; a partial one is scanned to nkb.
    const bool whole = nkb % kW == 0;
    const MatB ktb{kt.panel_stride == 0 ? kt.p + j0 : kt.p + j0 / kPanel * kt.panel_stride, kt.ld,
                   kt.panel_stride};
    for (int64_t b0 = 0; b0 < mq; b0 += kFwdBlockQ) {
      const int64_t mb = std::min(kFwdBlockQ, mq - b0);
      attn::OnlineRow* rb = rows + b0;
      float* ab = acc + b0 * d;
      if (whole) std::fill(rmax, rmax + mb * kW, attn::neg_infinity());
      gemm(mb, round_up(nkb, kW), d, {q + b0 * d, d, 1}, ktb, {s, lds}, false, whole ? rmax : nullptr);
      for (int64_t r = 0; r < mb; ++r) {
        float* sr = s + r * lds;
        const float mx = whole ? hmax(Vec::loadu(rmax + r * kW)) : row_max(sr, nkb);
        const float alpha = attn::online_rescale<attn::NaturalExp>(rb[r], mx);
        attn::online_add(rb[r], exp_shift_sum(sr, nkb, rb[r].m));
        if (alpha != 1.0f) scale_row(ab + r * d, d, alpha);
      }
      gemm(mb, d, nkb, {s, lds, 1}, {a.v + (bh * a.nk + j0) * d, d}, {ab, d}, true);
    }
  }
  for (int64_t r = 0; r < mq; ++r) {
    scale_row(acc + r * d, d, attn::online_inv_sum(rows[r]));
    std::copy(acc + r * d, acc + (r + 1) * d, a.out + (bh * a.nq + i0 + r) * d);
    a.lse[bh * a.nq + i0 + r] = attn::online_lse<attn::NaturalExp>(rows[r]);
  }
}

// One key block of the backward against every query block (FA-2 Alg. 2).
void backward_block(const AttentionBwdArgs& a, int64_t bh, int64_t split, int64_t j0, float* s,
                    float* dp, float* dk, float* dv) {
  const int64_t d = a.d, lds = kBwdLds;
  const int64_t nkb = std::min(kBwdBlockK, a.nk - j0), npad = round_up(nkb, kW);
  const float* k = a.k + (bh * a.nk + j0) * d;
  const MatB kt{a.kt + bh * d * a.ldk + j0, a.ldk}, vt{a.vt + bh * d * a.ldk + j0, a.ldk};
  std::fill(dk, dk + nkb * d, 0.0f);
  std::fill(dv, dv + nkb * d, 0.0f);
  for (int64_t i0 = 0; i0 < a.nq; i0 += kBwdBlockQ) {
    const int64_t mq = std::min(kBwdBlockQ, a.nq - i0), row0 = bh * a.nq + i0;
    const float* q = a.q + row0 * d;
    const float* dout = a.dout + row0 * d;
    gemm(mq, npad, d, {q, d, 1}, kt, {s, lds}, false);
    for (int64_t r = 0; r < mq; ++r) exp_shift_sum(s + r * lds, nkb, a.lse[row0 + r]);
    gemm(nkb, d, mq, {s, 1, lds}, {dout, d}, {dv, d}, true);  // dV += P^T dO
    gemm(mq, npad, d, {dout, d, 1}, vt, {dp, lds}, false);     // dP = dO V^T
    for (int64_t r = 0; r < mq; ++r) {
      const Vec delta(a.delta[row0 + r]);
      float* pr = s + r * lds;
      float* dpr = dp + r * lds;
      at::vec::map2([&delta](Vec p, Vec g) { return p * (g - delta); }, dpr, pr, dpr, nkb);
    }
    gemm(nkb, d, mq, {dp, 1, lds}, {q, d}, {dk, d}, true);  // dK += dS^T Q
    float* dq = a.dq_parts + (split * a.bh * a.nq + row0) * d;
    gemm(mq, d, nkb, {dp, lds, 1}, {k, d}, {dq, d}, true);  // dQ += dS K
  }
  // S = scale Q K^T, so dK = scale dS^T Q.
  at::vec::map([&a](Vec x) { return x * Vec(a.scale); }, a.dk + (bh * a.nk + j0) * d, dk, nkb * d);
  std::copy(dv, dv + nkb * d, a.dv + (bh * a.nk + j0) * d);
}

// at::parallel_for grain for `tasks` tasks doing `total` work between them:
// all on the calling thread up to kAttentionMinParallelWork.
int64_t grain(int64_t total, int64_t tasks) {
  return grain_for((total + tasks - 1) / tasks, kAttentionMinParallelWork);
}

}  // namespace

void attention_fwd_kernel(const AttentionFwdArgs& a) {
  const int64_t task_rows = forward_task_rows(a);
  const int64_t nqb = (a.nq + task_rows - 1) / task_rows, tasks = a.bh * nqb;
  const int64_t work = attention_fwd_work(a.bh, a.nq, a.nk, a.d);
  at::parallel_for(0, tasks, grain(work, tasks), [&](int64_t begin, int64_t end) {
    AlignedFloats s(kFwdBlockQ * kFwdLds), acc(task_rows * a.d), rmax(kFwdBlockQ * kW);
    std::vector<attn::OnlineRow> rows(task_rows);
    // This thread's tasks are consecutive, so it packs each of its heads once
    // (unless it has fewer than a block of query rows to use the panels on).
    const bool panels = a.nk > kFwdPanelKeys && a.nq >= kFwdBlockQ;
    AlignedFloats ktp(panels ? round_up(a.nk, kPanel) * a.d : 0);
    int64_t packed = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, i0 = (t % nqb) * task_rows;
      if (panels && bh != packed) pack_panels(a, packed = bh, ktp.data());
      const MatB kt = panels ? MatB{ktp.data(), kPanel, a.d * kPanel} : MatB{a.kt + bh * a.d * a.ldk, a.ldk};
      forward_block(a, kt, bh, i0, std::min(task_rows, a.nq - i0), s.data(), acc.data(), rmax.data(),
                    rows.data());
    }
  });
}

void attention_bwd_kernel(const AttentionBwdArgs& a) {
  const int64_t nkb = (a.nk + kBwdBlockK - 1) / kBwdBlockK;
  const int64_t per_split = (nkb + a.splits - 1) / a.splits, tasks = a.bh * a.splits;
  const int64_t keys = std::min(a.nk, per_split * kBwdBlockK);  // of a split (the last may have fewer)
  const int64_t work = attention_bwd_work(a.bh, a.nq, keys, a.d, a.splits);
  at::parallel_for(0, tasks, grain(work, tasks), [&](int64_t begin, int64_t end) {
    AlignedFloats s(kBwdBlockQ * kBwdLds), dp(kBwdBlockQ * kBwdLds);
    AlignedFloats dk(kBwdBlockK * a.d), dv(kBwdBlockK * a.d);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / a.splits, split = t % a.splits;
      const int64_t jb_end = std::min(nkb, (split + 1) * per_split);
      for (int64_t jb = split * per_split; jb < jb_end; ++jb)
        backward_block(a, bh, split, jb * kBwdBlockK, s.data(), dp.data(), dk.data(), dv.data());
    }
  });
}

}  // namespace sgdm::cpu::CPU_CAPABILITY
