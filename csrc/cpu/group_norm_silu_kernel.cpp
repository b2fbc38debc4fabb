// GroupNorm(+SiLU) forward and backward, CPU kernels (compiled once per ISA;
// see dispatch.h). SiLU maths: sgdm/silu.h; statistics merge: sgdm/welford.h,
// both shared with the CUDA kernels.
//
// Forward per group (M = C/G * HW elements):
//   mean, var over the group (biased), rstd = 1 / sqrt(var + eps)
//   xhat = (x - mean) * rstd,  z = xhat * weight_c + bias_c,  y = silu(z) (or z)
// Backward, with dz = dy * silu'(z) and sums over the group:
//   dx = rstd * (dz * w_c - sum(dz * w_c) / M - xhat * sum(dz * w_c * xhat) / M)
//   dweight_c = sum_{n,hw} dz * xhat,  dbias_c = sum_{n,hw} dz
// A per-sample affine (weight_{n,c}, bias_{n,c}) changes only which value w_c
// and b_c are, and its gradients are the per-sample sums over hw alone.
#include "cpu/group_norm_silu_kernel.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/vec_io.h"
#include "sgdm/silu.h"
#include "sgdm/welford.h"

namespace sgdm::cpu::CPU_CAPABILITY {
namespace {

template <typename Acc>
using Vec = at::vec::Vectorized<Acc>;

// One group of one sample as seg_count runs of seg_len contiguous elements,
// seg_stride apart. NCHW: a run per channel (HW long). NHWC: a run per
// position (C/G long), whose element j is channel j of the group.
struct Block {
  int64_t offset;
  int64_t seg_count;
  int64_t seg_len;
  int64_t seg_stride;
};

Block block_of(const GroupNormShape& s, int64_t n, int64_t g) {
  const int64_t cg = s.c / s.groups;
  if (s.channels_last) return {n * s.hw * s.c + g * cg, s.hw, cg, s.c};
  return {(n * s.c + g * cg) * s.hw, cg, s.hw, s.hw};
}

// Per-channel value for run s, elements [i, i + n): a broadcast in NCHW
// (one channel per run) or a load in NHWC (one channel per element).
template <bool kCL, typename Acc>
inline Vec<Acc> per_channel(const Acc* values, int64_t s, int64_t i, int64_t n) {
  if constexpr (kCL) {
    return Vec<Acc>::loadu(values + i, n);
  } else {
    return Vec<Acc>(values[s]);
  }
}

// 1 / (1 + exp(-z)), float on AVX2 / AVX-512. exp(-z) = 2^n * e^r with
// n = round(-z * log2(e)) and r = -z - n * ln2 in [-ln2/2, ln2/2]; e^r by a
// degree-5 minimax polynomial (relative error 2.2e-7 in float arithmetic),
// 2^n by scalef (AVX-512) or the exponent bits (AVX2), and the reciprocal as
// rcp + one Newton step (about 1e-7) instead of a division. z is clamped to
// [-87, 87] so exp(-z) stays finite and normal (rcp(inf) * 0 would give NaN;
// sigmoid there is 1 or < 2e-38 anyway); NaN propagates. This is cheaper than exp_u20 followed by a division, and the
// exponential dominates the cost of this otherwise memory-bound op.
#define SGDM_EXP_POLY(F, r) \
  F##_fmadd_ps(F##_fmadd_ps(F##_fmadd_ps(F##_fmadd_ps(F##_fmadd_ps( \
      F##_set1_ps(0.008297654800117016f), r, F##_set1_ps(0.04191538318991661f)), r, \
      F##_set1_ps(0.16667574644088745f)), r, F##_set1_ps(0.49998894333839417f)), r, \
      F##_set1_ps(0.9999997019767761f)), r, F##_set1_ps(1.0000001192092896f))
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 fast_sigmoid_ps(__m512 z) {
  // The clamp as one vrangeps, sign(z) * min(|z|, 87) (5% faster than min + max here).
  const __m512 zc = _mm512_range_ps(z, _mm512_set1_ps(87.f), 0x02);
  const __m512 t = _mm512_mul_ps(zc, _mm512_set1_ps(-1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmsub_ps(n, _mm512_set1_ps(0.693147180559945309f), zc);  // -n ln2 - z
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), _mm512_scalef_ps(SGDM_EXP_POLY(_mm512, r), n));
  const __m512 q = _mm512_rcp14_ps(d);
  return _mm512_fmadd_ps(q, _mm512_fnmadd_ps(d, q, _mm512_set1_ps(1.f)), q);
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 fast_sigmoid_ps(__m256 z) {
  const __m256 zc = _mm256_max_ps(_mm256_set1_ps(-87.f), _mm256_min_ps(_mm256_set1_ps(87.f), z));
  const __m256 t = _mm256_mul_ps(zc, _mm256_set1_ps(-1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmsub_ps(n, _mm256_set1_ps(0.693147180559945309f), zc);  // -n ln2 - z
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(SGDM_EXP_POLY(_mm256, r), _mm256_castsi256_ps(bits));
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), e);
  const __m256 q = _mm256_rcp_ps(d);
  return _mm256_fmadd_ps(q, _mm256_fnmadd_ps(d, q, _mm256_set1_ps(1.f)), q);
}
#endif
#undef SGDM_EXP_POLY

template <typename Acc>
inline Vec<Acc> sigmoid(Vec<Acc> z) {
  const Vec<Acc> one(1);
  if constexpr (std::is_same_v<Acc, float>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    return Vec<Acc>(fast_sigmoid_ps(z));
#else
    return one / (one + z.neg().exp_u20());
#endif
  } else {
    return one / (one + z.neg().exp());
  }
}

template <typename Acc>
inline Acc sum_lanes(Vec<Acc> v) {
  return at::vec::vec_reduce_all<Acc>([](Vec<Acc> a, Vec<Acc> b) { return a + b; }, v);
}

constexpr int64_t kStatChunk = 2048;  // elements per Welford partial

// The Welford partial of len elements from the lane sums of d = x - k and d^2,
// combined in double.
template <typename Acc>
WelfordData<double> shifted_partial(Acc k, Vec<Acc> s1, Vec<Acc> s2, int64_t len) {
  const double n = static_cast<double>(len);
  const double sum1 = static_cast<double>(sum_lanes(s1)), sum2 = static_cast<double>(sum_lanes(s2));
  return {static_cast<double>(k) + sum1 / n, std::max(sum2 - sum1 * sum1 / n, 0.0), n};
}

// Mean and M2 of one short run from sums shifted by k, as a Welford partial to
// merge; the lane sums are combined in double.
// kChains 1 sums in the order of fwd_range_nchw's fused pass (one accumulator pair), which the first
// group of its range must match bit for bit: else a group's statistics, and so the output, would
// depend on whether it opens a thread's range, i.e. on the thread count.
template <typename T, int kChains = 4, typename Acc = acc_t<T>>
WelfordData<double> shifted_stats(const T* p, int64_t len, Acc k) {
  static_assert(kChains == 1 || kChains == 4, "shifted_stats: one or four accumulator pairs");
  using V = Vec<Acc>;
  const V kv(k);
  // Four independent accumulator pairs: one add / FMA chain would bound the
  // loop by its latency (~4 cycles a vector) instead of the loads.
  V s1(0), s2(0), a1(0), a2(0), b1(0), b2(0), c1(0), c2(0);
  int64_t i = 0;
  constexpr int64_t kU = 4 * V::size();
  for (; kChains == 4 && i + kU <= len; i += kU) {
    const V d0 = load_acc<T>(p + i) - kv;
    const V d1 = load_acc<T>(p + i + V::size()) - kv;
    const V d2 = load_acc<T>(p + i + 2 * V::size()) - kv;
    const V d3 = load_acc<T>(p + i + 3 * V::size()) - kv;
    s1 += d0;
    s2 = at::vec::fmadd(d0, d0, s2);
    a1 += d1;
    a2 = at::vec::fmadd(d1, d1, a2);
    b1 += d2;
    b2 = at::vec::fmadd(d2, d2, b2);
    c1 += d3;
    c2 = at::vec::fmadd(d3, d3, c2);
  }
  if constexpr (kChains == 4) {
    s1 = (s1 + a1) + (b1 + c1);
    s2 = (s2 + a2) + (b2 + c2);
  }
  for (; i + V::size() <= len; i += V::size()) {
    const V d = load_acc<T>(p + i) - kv;
    s1 += d;
    s2 = at::vec::fmadd(d, d, s2);
  }
  if (i < len) {
    const V d = V::set(V(0), load_acc<T>(p + i, len - i) - kv, len - i);
    s1 += d;
    s2 = at::vec::fmadd(d, d, s2);
  }
  return shifted_partial<Acc>(k, s1, s2, len);
}

// The partial w of the run [p, p + len), shifted by k, shifted again by its
// mean when that lies more than a standard deviation from k: sum(d^2) -
// sum(d)^2 / n cancels by a factor 1 + (mean - k)^2 / var, so an outlying
// shift element (a 30-sigma corner pixel) would cost about 10 bits of the
// variance. The run is at most kStatChunk elements, still in L1.
template <typename T, typename Acc = acc_t<T>>
WelfordData<double> recentred(const T* p, int64_t len, Acc k, const WelfordData<double>& w) {
  const double off = w.mean - static_cast<double>(k);
  if (!(off * off * w.count > w.m2)) return w;  // (also NaN / inf: nothing to gain)
  return shifted_stats<T>(p, len, static_cast<Acc>(w.mean));
}

// Mean and M2 of one short run: sums shifted by its first element, then by its
// mean if that was far from it.
template <typename T, int kChains = 4, typename Acc = acc_t<T>>
WelfordData<double> run_stats(const T* p, int64_t len) {
  const Acc k = static_cast<Acc>(p[0]);
  return recentred<T>(p, len, k, shifted_stats<T, kChains>(p, len, k));
}

template <typename T, int kChains = 4>
WelfordData<double> block_stats(const T* x, const Block& b) {
  WelfordData<double> w{0.0, 0.0, 0.0};
  for (int64_t s = 0; s < b.seg_count; ++s) {
    const T* p = x + b.offset + s * b.seg_stride;
    for (int64_t i = 0; i < b.seg_len; i += kStatChunk) {
      w = welford_merge(w, run_stats<T, kChains>(p + i, std::min(kStatChunk, b.seg_len - i)));
    }
  }
  return w;
}

// weight / bias of the group's channels (1 / 0 when absent), from sample rows.
template <typename Acc>
void group_affine(const Acc* w, const Acc* b, int64_t c0, int64_t cg, Acc* gamma, Acc* beta) {
  for (int64_t j = 0; j < cg; ++j) {
    gamma[j] = w ? w[c0 + j] : Acc(1);
    beta[j] = b ? b[c0 + j] : Acc(0);
  }
}

// Writes mean and rstd of group gi (= n * G + g) from its statistics, and the
// per-channel scale = rstd * w_c and shift = b_c of z = (x - mean) * scale + shift.
// Subtracting the mean first keeps z exact when rstd is large (a nearly
// constant group). Returns the mean.
template <typename Acc>
Acc group_coeffs(const GroupNormFwdArgs& a, int64_t gi, const WelfordData<double>& w, Acc* scale,
                 Acc* shift) {
  const int64_t cg = a.s.c / a.s.groups;
  const double rstd = 1.0 / std::sqrt(welford_variance(w) + a.eps);
  static_cast<Acc*>(a.mean)[gi] = static_cast<Acc>(w.mean);
  static_cast<Acc*>(a.rstd)[gi] = static_cast<Acc>(rstd);
  const int64_t n = gi / a.s.groups;
  group_affine<Acc>(affine_row<Acc>(a.weight, a.weight_stride, n),
                    affine_row<Acc>(a.bias, a.bias_stride, n), (gi % a.s.groups) * cg, cg, scale,
                    shift);
  for (int64_t j = 0; j < cg; ++j) scale[j] = static_cast<Acc>(rstd * static_cast<double>(scale[j]));
  return static_cast<Acc>(w.mean);
}

// Channels-last: one group at a time, a statistics pass then a normalising pass.
template <typename T, bool kSilu>
void fwd_group_nhwc(const GroupNormFwdArgs& a, int64_t gi, std::vector<acc_t<T>>& buf) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  const int64_t cg = a.s.c / a.s.groups;
  const Block b = block_of(a.s, gi / a.s.groups, gi % a.s.groups);
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  buf.resize(2 * cg);
  Acc *scale = buf.data(), *shift = scale + cg;
  const V mv(group_coeffs<Acc>(a, gi, block_stats(x, b), scale, shift));
  for (int64_t s = 0; s < b.seg_count; ++s) {
    const int64_t off = b.offset + s * b.seg_stride;
    for (int64_t i = 0; i < b.seg_len; i += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), b.seg_len - i);
      V z = at::vec::fmadd(load_acc<T>(x + off + i, m) - mv, V::loadu(scale + i, m),
                           V::loadu(shift + i, m));
      if constexpr (kSilu) z = silu_from_sigmoid(z, sigmoid(z));
      store_acc<T>(y + off + i, z, m);
    }
  }
}

// NCHW: group gi is the contiguous run [gi * len, (gi + 1) * len), len = C/G * HW,
// and group gi + 1 follows it. The normalising pass over group gi, bound by the
// exponential, also accumulates the statistics of group gi + 1, whose loads then
// hide behind the arithmetic; a separate statistics pass runs only for the first
// group of the range (5-10% faster than a separate statistics pass here, fp32
// 8x256x32x32 and 8x128x64x64, one thread).
template <typename T, bool kSilu>
void fwd_range_nchw(const GroupNormFwdArgs& a, int64_t begin, int64_t end,
                    std::vector<acc_t<T>>& buf) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  const int64_t cg = a.s.c / a.s.groups, hw = a.s.hw, len = cg * hw;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  buf.resize(2 * cg);
  Acc *scale = buf.data(), *shift = scale + cg;
  // the range's first group in the fused pass's order (one chain), as every later group is summed
  WelfordData<double> w = block_stats<T, 1>(x, Block{begin * len, cg, hw, hw});
  for (int64_t gi = begin; gi < end; ++gi) {
    const V mv(group_coeffs<Acc>(a, gi, w, scale, shift));
    const T* xg = x + gi * len;
    const T* xn = xg + len;  // the next group
    T* yg = y + gi * len;
    // Returns the next group's statistics (kNext), in kStatChunk partials per channel.
    auto pass = [&](auto next_tag) {
      constexpr bool kNext = decltype(next_tag)::value;
      WelfordData<double> wn{0.0, 0.0, 0.0};
      for (int64_t c = 0; c < cg; ++c) {
        const V sc(scale[c]), sh(shift[c]);
        for (int64_t c0 = c * hw, c_end = (c + 1) * hw; c0 < c_end; c0 += kStatChunk) {
          const int64_t c1 = std::min(c0 + kStatChunk, c_end);
          const Acc k = kNext ? static_cast<Acc>(xn[c0]) : Acc(0);
          const V kv(k);
          V s1(0), s2(0);
          auto step = [&](int64_t i, int64_t m) {
            V z = at::vec::fmadd(load_acc<T>(xg + i, m) - mv, sc, sh);
            if constexpr (kSilu) z = silu_from_sigmoid(z, sigmoid(z));
            store_acc<T>(yg + i, z, m);
            if constexpr (kNext) {
              // group gi + 2 towards L2, for the next pass's statistics (harmless past the end)
              __builtin_prefetch(reinterpret_cast<const char*>(xn + len + i), 0, 2);
              V d = load_acc<T>(xn + i, m) - kv;
              if (m < V::size()) d = V::set(V(0), d, m);
              s1 += d;
              s2 = at::vec::fmadd(d, d, s2);
            }
          };
          int64_t i = c0;
          for (; i + V::size() <= c1; i += V::size()) step(i, V::size());
          if (i < c1) step(i, c1 - i);
          if constexpr (kNext) {
            wn = welford_merge(wn, recentred<T>(xn + c0, c1 - c0, k, shifted_partial<Acc>(k, s1, s2, c1 - c0)));
          }
        }
      }
      return wn;
    };
    if (gi + 1 < end) {
      w = pass(std::true_type{});
    } else {
      pass(std::false_type{});
    }
  }
}

// Scratch per group: gamma, beta, sum_dz, sum_dzx (C/G each).
template <typename T, bool kCL, bool kSilu>
void bwd_group(const GroupNormBwdArgs& a, int64_t n, int64_t g, std::vector<acc_t<T>>& buf) {
  using Acc = acc_t<T>;
  using V = Vec<Acc>;
  const int64_t cg = a.s.c / a.s.groups;
  const Block b = block_of(a.s, n, g);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.grad_y);
  T* dx = static_cast<T*>(a.grad_x);
  const Acc mean = static_cast<const Acc*>(a.mean)[n * a.s.groups + g];
  const Acc rstd = static_cast<const Acc*>(a.rstd)[n * a.s.groups + g];
  // Pass 1 parks dz (in Acc precision) and pass 2 reads it back instead of
  // recomputing the exponential; the group stays in cache in between. fp32 /
  // fp64 park it in grad_x itself, fp16 / bf16 in a float scratch run.
  constexpr bool kParkInDx = std::is_same_v<T, Acc>;
  const int64_t group_elems = b.seg_count * b.seg_len;
  buf.assign(4 * cg + (kParkInDx ? 0 : group_elems), Acc(0));
  Acc *gamma = buf.data(), *beta = gamma + cg, *sdz = beta + cg, *sdzx = sdz + cg;
  Acc* scratch = sdzx + cg;
  auto park = [&](int64_t off, int64_t s, int64_t i) -> Acc* {
    if constexpr (kParkInDx) return reinterpret_cast<Acc*>(dx) + off + i;
    return scratch + s * b.seg_len + i;
  };
  group_affine<Acc>(affine_row<Acc>(a.weight, a.weight_stride, n),
                    affine_row<Acc>(a.bias, a.bias_stride, n), g * cg, cg, gamma, beta);
  const V rs(rstd), mv(mean);
  // dz at elements [i, i + m) of run s, and xhat there. Lanes past m load
  // dy = 0, so they contribute nothing to the sums.
  auto grad_z = [&](int64_t off, int64_t s, int64_t i, int64_t m, V& xhat) {
    xhat = (load_acc<T>(x + off + i, m) - mv) * rs;  // not x*rstd - mean*rstd: that cancels
    V dz = load_acc<T>(dy + off + i, m);
    if constexpr (kSilu) {
      const V z = at::vec::fmadd(xhat, per_channel<kCL>(gamma, s, i, m),
                                 per_channel<kCL>(beta, s, i, m));
      dz = dz * silu_grad_from_sigmoid(z, sigmoid(z));
    }
    return dz;
  };
  for (int64_t s = 0; s < b.seg_count; ++s) {
    const int64_t off = b.offset + s * b.seg_stride;
    V acc_dz(0), acc_dzx(0);
    for (int64_t i = 0; i < b.seg_len; i += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), b.seg_len - i);
      V xhat;
      const V dz = grad_z(off, s, i, m, xhat);
      dz.store(park(off, s, i), m);
      if constexpr (kCL) {
        (V::loadu(sdz + i, m) + dz).store(sdz + i, m);
        at::vec::fmadd(dz, xhat, V::loadu(sdzx + i, m)).store(sdzx + i, m);
      } else {
        acc_dz += dz;
        acc_dzx = at::vec::fmadd(dz, xhat, acc_dzx);
      }
    }
    if constexpr (!kCL) {
      sdz[s] = sum_lanes(acc_dz);
      sdzx[s] = sum_lanes(acc_dzx);
    }
  }
  double sum_a = 0.0, sum_b = 0.0;  // sum(dz * w), sum(dz * w * xhat)
  for (int64_t j = 0; j < cg; ++j) {
    sum_a += static_cast<double>(gamma[j]) * sdz[j];
    sum_b += static_cast<double>(gamma[j]) * sdzx[j];
  }
  const double inv_m = 1.0 / static_cast<double>(b.seg_count * b.seg_len);  // 1 / (C/G * HW)
  const V c1(static_cast<Acc>(-rstd * sum_a * inv_m)), c2(static_cast<Acc>(-rstd * sum_b * inv_m));
  for (int64_t s = 0; s < b.seg_count; ++s) {
    const int64_t off = b.offset + s * b.seg_stride;
    for (int64_t i = 0; i < b.seg_len; i += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), b.seg_len - i);
      const V dz = V::loadu(park(off, s, i), m);
      const V xhat = (load_acc<T>(x + off + i, m) - mv) * rs;
      const V out = at::vec::fmadd(dz, per_channel<kCL>(gamma, s, i, m) * rs,
                                   at::vec::fmadd(xhat, c2, c1));
      store_acc<T>(dx + off + i, out, m);
    }
  }
  if (a.sum_dz != nullptr) {
    std::copy(sdz, sdz + cg, static_cast<Acc*>(a.sum_dz) + n * a.s.c + g * cg);
    std::copy(sdzx, sdzx + cg, static_cast<Acc*>(a.sum_dzx) + n * a.s.c + g * cg);
  }
}

// Runs Fn<T, kCL, kSilu>::range(args, begin, end, scratch) over the N*G groups,
// split into contiguous ranges across threads.
template <template <typename, bool, bool> class Fn, typename Args>
void for_each_group(const Args& a) {
  dispatch_dtype(a.s.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto cl, auto silu) {
      const int64_t grain = grain_for(a.s.c / a.s.groups * a.s.hw);
      at::parallel_for(0, a.s.n * a.s.groups, grain, [&](int64_t begin, int64_t end) {
        std::vector<acc_t<T>> scratch;
        Fn<T, decltype(cl)::value, decltype(silu)::value>::range(a, begin, end, scratch);
      });
    };
    using True = std::true_type;
    using False = std::false_type;
    if (a.s.channels_last) {
      a.s.silu ? run(True{}, True{}) : run(True{}, False{});
    } else {
      a.s.silu ? run(False{}, True{}) : run(False{}, False{});
    }
  });
}

template <typename T, bool kCL, bool kSilu>
struct Fwd {
  static void range(const GroupNormFwdArgs& a, int64_t begin, int64_t end,
                    std::vector<acc_t<T>>& b) {
    if constexpr (kCL) {
      for (int64_t gi = begin; gi < end; ++gi) fwd_group_nhwc<T, kSilu>(a, gi, b);
    } else {
      fwd_range_nchw<T, kSilu>(a, begin, end, b);
    }
  }
};

template <typename T, bool kCL, bool kSilu>
struct Bwd {
  static void range(const GroupNormBwdArgs& a, int64_t begin, int64_t end,
                    std::vector<acc_t<T>>& b) {
    for (int64_t gi = begin; gi < end; ++gi) {
      bwd_group<T, kCL, kSilu>(a, gi / a.s.groups, gi % a.s.groups, b);
    }
  }
};

}  // namespace

void group_norm_silu_fwd_kernel(const GroupNormFwdArgs& args) { for_each_group<Fwd>(args); }

void group_norm_silu_bwd_kernel(const GroupNormBwdArgs& args) { for_each_group<Bwd>(args); }

}  // namespace sgdm::cpu::CPU_CAPABILITY
