// Per-ISA CPU kernels and their run-time selection.
//
// Every csrc/cpu/*_kernel.cpp is compiled once per instruction set by
// setup.py / CMakeLists.txt, with
//   baseline: -DCPU_CAPABILITY=DEFAULT
//   AVX2:     -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 -mavx2 -mfma -mf16c
//             (on x86-64; other CPUs, e.g. aarch64, build the baseline only, with
//             SGDM_CPU_AVX2 defined as 0: ATen's Vectorized is NEON there)
//   AVX-512:  -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 -mavx512f ...
//             (only when SGDM_CPU_AVX512 is defined as 1 for the whole build)
// A kernel file defines its functions inside `namespace sgdm::cpu::CPU_CAPABILITY`,
// which is also the inline namespace ATen puts at::vec::Vectorized in, so each
// copy gets a distinct name. Op files declare them with SGDM_CPU_DECLARE and
// call them with SGDM_CPU_DISPATCH, which picks the best compiled ISA the
// machine supports, honouring ATEN_CPU_CAPABILITY and set_isa_override().
#pragma once

#include <string>

#ifndef SGDM_CPU_AVX2
#define SGDM_CPU_AVX2 1
#endif
#ifndef SGDM_CPU_AVX512
#define SGDM_CPU_AVX512 0
#endif
#if SGDM_CPU_AVX512 && !SGDM_CPU_AVX2
#error "sgdm: SGDM_CPU_AVX512=1 needs SGDM_CPU_AVX2=1"
#endif

#if SGDM_CPU_AVX2
#define SGDM_IF_AVX2(...) __VA_ARGS__
#else
#define SGDM_IF_AVX2(...)
#endif

#if SGDM_CPU_AVX512
#define SGDM_IF_AVX512(...) __VA_ARGS__
#else
#define SGDM_IF_AVX512(...)
#endif

namespace sgdm::cpu {

enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA whose kernels run now: the override if set, else the best one that
// is compiled and that at::get_cpu_capability() allows.
Isa active_isa();

// "default" | "avx2" | "avx512".
std::string isa_name(Isa isa);

// Forces an ISA (tests use it to cover every path in one process); an empty
// name clears the override. Raises if the ISA is unknown, not compiled, or
// not supported by this CPU. Returns the previous override ("" if none).
std::string set_isa_override(const std::string& name);

}  // namespace sgdm::cpu

// Declares `ret name params` in every compiled ISA namespace.
#define SGDM_CPU_DECLARE(ret, name, params)          \
  namespace sgdm::cpu::DEFAULT { ret name params; }  \
  SGDM_IF_AVX2(namespace sgdm::cpu::AVX2 { ret name params; }) \
  SGDM_IF_AVX512(namespace sgdm::cpu::AVX512 { ret name params; })

// Calls the copy of `name` for the active ISA.
#define SGDM_CPU_DISPATCH(name, ...)                                   \
  [&]() {                                                              \
    switch (::sgdm::cpu::active_isa()) {                               \
      SGDM_IF_AVX512(case ::sgdm::cpu::Isa::kAvx512:                   \
                       return ::sgdm::cpu::AVX512::name(__VA_ARGS__);) \
      SGDM_IF_AVX2(case ::sgdm::cpu::Isa::kAvx2:                     \
                     return ::sgdm::cpu::AVX2::name(__VA_ARGS__);)     \
      default:                                                         \
        return ::sgdm::cpu::DEFAULT::name(__VA_ARGS__);                \
    }                                                                  \
  }()
