// Loads and stores between any supported element type and the Vectorized<Acc>
// used for arithmetic (Acc = float, or double for fp64 data). Included only
// from per-ISA kernel files, so it inherits their CPU_CAPABILITY, and its
// functions live in that ISA's namespace: each kernel file's copy keeps its
// own name (one inline function under one name in the AVX2 and AVX-512 objects
// would let the linker keep either body, and an AVX2 machine could then run
// an AVX-512 instruction wherever the call was not inlined).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

#include "sgdm/dtype.h"

namespace sgdm::cpu::CPU_CAPABILITY {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool kIsHalfOrBf16 = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// bf16 / fp16 <-> float for a whole vector in registers. A scalar loop through
// c10's conversions made the low-precision kernels 2-3x slower than eager
// PyTorch. bf16 is the top half of a float: widening is a shift, narrowing
// rounds to nearest even by adding 0x7fff + lsb before the shift (NaN becomes
// 0x7fc0, as in c10::BFloat16). fp16 uses the F16C / AVX-512 conversions
// (round to nearest even). Lanes past n load as zero and are not stored.
namespace half_io {
#if defined(CPU_CAPABILITY_AVX512)
inline __m256i load16(const void* p, int64_t n) {
  if (n >= 16) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
}
inline void store16(void* p, __m256i v, int64_t n) {
  if (n >= 16) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  } else {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), v);
  }
}
template <typename T>
inline __m512 widen(__m256i v) {
  if constexpr (std::is_same_v<T, c10::Half>) return _mm512_cvtph_ps(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
template <typename T>
inline __m256i narrow(__m512 f) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
inline __m128i load16(const void* p, int64_t n) {
  if (n >= 8) return _mm_loadu_si128(static_cast<const __m128i*>(p));
  alignas(16) uint16_t buf[8] = {};
  std::memcpy(buf, p, static_cast<size_t>(n) * 2);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}
inline void store16(void* p, __m128i v, int64_t n) {
  if (n >= 8) {
    _mm_storeu_si128(static_cast<__m128i*>(p), v);
  } else {
    alignas(16) uint16_t buf[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(buf), v);
    std::memcpy(p, buf, static_cast<size_t>(n) * 2);
  }
}
template <typename T>
inline __m256 widen(__m128i v) {
  if constexpr (std::is_same_v<T, c10::Half>) return _mm256_cvtph_ps(v);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
template <typename T>
inline __m128i narrow(__m256 f) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // every lane is <= 0xffff, so the unsigned-saturating pack is exact
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
}
#endif
}  // namespace half_io

// Loads n <= Vec::size() elements (the rest are zero).
template <typename T, typename Acc = acc_t<T>>
inline at::vec::Vectorized<Acc> load_acc(const T* p, int64_t n = at::vec::Vectorized<Acc>::size()) {
  using Vec = at::vec::Vectorized<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    return Vec::loadu(p, n);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (kIsHalfOrBf16<T> && std::is_same_v<Acc, float>) {
    return Vec(half_io::widen<T>(half_io::load16(p, n)));
#endif
  } else {
    Acc buf[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<Acc>(p[i]);
    return Vec::loadu(buf);
  }
}

template <typename T, typename Acc>
inline void store_acc(T* p, at::vec::Vectorized<Acc> v, int64_t n = at::vec::Vectorized<Acc>::size()) {
  using Vec = at::vec::Vectorized<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    v.store(p, n);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  } else if constexpr (kIsHalfOrBf16<T> && std::is_same_v<Acc, float>) {
    half_io::store16(p, half_io::narrow<T>(v), n);
#endif
  } else {
    Acc buf[Vec::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

// Horizontal sum (kMax = false) or maximum (true) of a float vector, in
// registers (a store and a scalar loop over 16 lanes cost ~40 cycles, paid
// twice per softmax row).
template <bool kMax>
inline float hreduce(at::vec::Vectorized<float> v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kMax) {
    return _mm512_reduce_max_ps(v);
  } else {
    return _mm512_reduce_add_ps(v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const auto op = [](__m128 a, __m128 b) {
    if constexpr (kMax) {
      return _mm_max_ps(a, b);
    } else {
      return _mm_add_ps(a, b);
    }
  };
  __m128 x = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = op(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(op(x, _mm_movehdup_ps(x)));
#else
  float lanes[at::vec::Vectorized<float>::size()];
  v.store(lanes);
  float r = lanes[0];
  for (int64_t i = 1; i < at::vec::Vectorized<float>::size(); ++i) {
    r = kMax ? (lanes[i] > r ? lanes[i] : r) : r + lanes[i];
  }
  return r;
#endif
}

inline float hsum(at::vec::Vectorized<float> v) { return hreduce<false>(v); }
inline float hmax(at::vec::Vectorized<float> v) { return hreduce<true>(v); }

// Calls fn(T{}) with T the C++ type of `dtype`.
template <typename Fn>
inline void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
  }
}

}  // namespace sgdm::cpu::CPU_CAPABILITY
