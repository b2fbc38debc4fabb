// Run-time choice of the per-ISA CPU kernels (see dispatch.h).
#include "dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>

namespace sgdm::cpu {
namespace {

constexpr int kNoOverride = -1;
std::atomic<int> g_override{kNoOverride};

// The best compiled ISA that is at most `wanted`.
Isa best_compiled(Isa wanted) {
#if SGDM_CPU_AVX512
  return wanted;
#elif SGDM_CPU_AVX2
  return wanted == Isa::kAvx512 ? Isa::kAvx2 : wanted;
#else
  (void)wanted;
  return Isa::kDefault;
#endif
}

// at::get_cpu_capability() already honours ATEN_CPU_CAPABILITY and caps it
// at what the CPU supports, so it is the ceiling for every choice.
Isa machine_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::kAvx512;
    if (cap == "AVX2") return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return isa;
}

}  // namespace

Isa active_isa() {
  const int forced = g_override.load(std::memory_order_relaxed);
  if (forced != kNoOverride) return static_cast<Isa>(forced);
  return best_compiled(machine_isa());
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

std::string set_isa_override(const std::string& name) {
  const int prev = g_override.load();
  const std::string prev_name = prev == kNoOverride ? "" : isa_name(static_cast<Isa>(prev));
  if (name.empty()) {
    g_override.store(kNoOverride);
    return prev_name;
  }
  Isa isa;
  if (name == "default") {
    isa = Isa::kDefault;
  } else if (name == "avx2") {
    isa = Isa::kAvx2;
  } else if (name == "avx512") {
    isa = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "sgdm: unknown CPU ISA '", name, "'; expected default, avx2 or avx512");
  }
  TORCH_CHECK(best_compiled(isa) == isa, "sgdm: CPU ISA '", name,
              "' was not compiled into this build (AVX2 is built on x86-64 only; AVX-512 unless "
              "SGDM_CPU_AVX512=0)");
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(machine_isa()), "sgdm: CPU ISA '", name,
              "' is not supported by this CPU or is disabled by ATEN_CPU_CAPABILITY (best: ",
              isa_name(machine_isa()), ")");
  g_override.store(static_cast<int>(isa));
  return prev_name;
}

}  // namespace sgdm::cpu
