// The PTX ISA's canonical shared-memory layouts of wgmma operands (9.7.15.5.1.2),
// read from an operand descriptor: which byte an instruction reads for each
// element. Host code; shared by the descriptor check (wgmma_layouts.cu) and
// the CPU emulation of the wgmma kernels (wgmma_emulation.h).
#pragma once

#include <cstdint>

namespace wgmma_canonical {

struct Desc {
  uint32_t start, lbo, sbo;
  int units;  // 16-byte units per swizzle row: 8 (128B), 4 (64B), 2 (32B)
};

inline Desc decode(uint64_t d) {
  const int mode = static_cast<int>(d >> 62);
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4, mode == 1 ? 8 : mode == 2 ? 4 : mode == 3 ? 2 : 0};
}

// Swizzle<log2(units), 4, 3> on a byte address.
inline uint32_t swizzle(uint32_t addr, int units) { return addr ^ (((addr >> 7) & static_cast<uint32_t>(units - 1)) << 4); }

// K-major ((8,m),(T,2k)):((units T, SBO),(1,T)), T = 8 16-bit elements: row mn, column k < 16.
inline uint32_t kmajor_read(const Desc& d, int mn, int k) {
  return swizzle(d.start + static_cast<uint32_t>((mn % 8) * d.units * 16) + static_cast<uint32_t>(mn / 8) * d.sbo +
                     static_cast<uint32_t>(k * 2),
                 d.units);
}

// MN-major ((T,units,m),(8,k)):((1,T,LBO),(units T,SBO)): column n of B, row k < 16.
inline uint32_t nmajor_read(const Desc& d, int k, int n) {
  const int span = 8 * d.units;  // elements of N in one swizzle row
  return swizzle(d.start + static_cast<uint32_t>((n % span) * 2) + static_cast<uint32_t>(n / span) * d.lbo +
                     static_cast<uint32_t>((k % 8) * d.units * 16) + static_cast<uint32_t>(k / 8) * d.sbo,
                 d.units);
}

}  // namespace wgmma_canonical
