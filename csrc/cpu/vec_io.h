// Loads and stores between any supported element type and the Vectorized<Acc>
// used for arithmetic (Acc = float, or double for fp64 data). Included only
// from per-ISA kernel files, so it inherits their CPU_CAPABILITY.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "sgdm/dtype.h"

namespace sgdm::cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Loads n <= Vec::size() elements (the rest are zero).
template <typename T, typename Acc = acc_t<T>>
inline at::vec::Vectorized<Acc> load_acc(const T* p, int64_t n = at::vec::Vectorized<Acc>::size()) {
  using Vec = at::vec::Vectorized<Acc>;
  if constexpr (std::is_same_v<T, Acc>) {
    return Vec::loadu(p, n);
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
  } else {
    Acc buf[Vec::size()];
    v.store(buf);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
  }
}

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

}  // namespace sgdm::cpu
