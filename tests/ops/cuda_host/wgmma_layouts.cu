// Host-only check of the wgmma kernels' shared-memory addressing
// (csrc/cuda/attention_wgmma.cuh, attention_wgmma_bwd.cuh): for every operand
// of every instruction the forward and the backward issue, decode the descriptor with the PTX ISA's canonical layouts
// (9.7.15.5.1.2: the CuTe layouts of its table, then the swizzle on the byte
// address) and check that each element the instruction reads is the element
// Swizzle<D>::offset stored there. Runs on the CPU; prints the first
// mismatches and exits 1 when there is one.
#include <cstdio>

#include "attention_wgmma.cuh"
#include "attention_wgmma_bwd.cuh"
#include "wgmma_canonical.h"

using namespace sgdm::cuda_attn::wg;
using namespace wgmma_canonical;

namespace {

template <int D>
uint32_t stored(uint32_t tile, int rows, int r, int c) {
  return tile + Swizzle<D>::offset(rows, r, c & ~7) + static_cast<uint32_t>((c & 7) * 2);
}

int mismatches = 0;
void expect(uint32_t got, uint32_t want, const char* what, int a, int b, int c, int d) {
  if (got == want) return;
  if (++mismatches <= 10)
    std::printf("MISMATCH %s (%d, %d, %d, %d): the instruction reads byte %u, the element is at %u\n", what, a, b, c, d,
                got, want);
}

template <int D, int kM, int kN>
void check() {
  using Descs = OperandDescs<D, kM, kN>;
  // Tile bases as the kernel lays them out after aligning to 1024 (any 1024-aligned base).
  const uint32_t q = 1024 * 3, k = q + kM * D * 2, v = k + 2 * kN * D * 2;
  for (int wg = 0; wg < kM / 64; ++wg)
    for (int kk = 0; kk < D / 16; ++kk) {
      const Desc a = decode(Descs::q(q, wg, kk));
      for (int m = 0; m < 64; ++m)
        for (int c = 0; c < 16; ++c)
          expect(kmajor_read(a, m, c), stored<D>(q, kM, wg * 64 + m, kk * 16 + c), "Q", D, wg, m, kk * 16 + c);
    }
  for (int buf = 0; buf < 2; ++buf) {
    const uint32_t kb = k + static_cast<uint32_t>(buf * kN * D * 2), vb = v + static_cast<uint32_t>(buf * kN * D * 2);
    for (int kk = 0; kk < D / 16; ++kk) {
      const Desc b = decode(Descs::k(kb, kk));
      for (int n = 0; n < kN; ++n)
        for (int c = 0; c < 16; ++c)
          expect(kmajor_read(b, n, c), stored<D>(kb, kN, n, kk * 16 + c), "K", D, buf, n, kk * 16 + c);
    }
    for (int kc = 0; kc < kN / 16; ++kc) {
      const Desc b = decode(Descs::v(vb, kc));
      for (int key = 0; key < 16; ++key)
        for (int n = 0; n < D; ++n)
          expect(nmajor_read(b, key, n), stored<D>(vb, kN, kc * 16 + key, n), "V", D, buf, kc * 16 + key, n);
    }
  }
}

// The backward's operands (BwdOperandDescs): K and V tiles of kN keys, Q and dO
// tiles of kM query rows (two buffers each), a warpgroup's dS^T tile [64][kM].
template <int D, int kN, int kM>
void check_backward() {
  using Descs = BwdOperandDescs<D, kN, kM>;
  constexpr int kPN = D / WgBwdConfig<D, kN / 64>::kDqParts;
  const uint32_t k = 1024 * 5, v = k + kN * D * 2, q = v + kN * D * 2, dout = q + 2 * kM * D * 2,
                 ds = dout + 2 * kM * D * 2;
  for (uint32_t kv : {k, v})
    for (int wg = 0; wg < kN / 64; ++wg)
      for (int kk = 0; kk < D / 16; ++kk) {  // A of S^T = K_w Q^T and dP^T = V_w dO^T
        const Desc a = decode(Descs::keys(kv, wg, kk));
        for (int m = 0; m < 64; ++m)
          for (int c = 0; c < 16; ++c)
            expect(kmajor_read(a, m, c), stored<D>(kv, kN, wg * 64 + m, kk * 16 + c), "K/V rows", D, wg, m, kk * 16 + c);
      }
  for (int buf = 0; buf < 4; ++buf) {  // Q and dO, two buffers each
    const uint32_t tile = (buf < 2 ? q : dout) + static_cast<uint32_t>((buf % 2) * kM * D * 2);
    for (int kk = 0; kk < D / 16; ++kk) {  // B of S^T and dP^T
      const Desc b = decode(Descs::queries(tile, kk));
      for (int n = 0; n < kM; ++n)
        for (int c = 0; c < 16; ++c)
          expect(kmajor_read(b, n, c), stored<D>(tile, kM, n, kk * 16 + c), "Q/dO cols", D, buf, n, kk * 16 + c);
    }
    for (int kc = 0; kc < kM / 16; ++kc) {  // B of dV += P^T dO and dK += dS^T Q
      const Desc b = decode(Descs::queries_n(tile, kc));
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < D; ++n)
          expect(nmajor_read(b, r, n), stored<D>(tile, kM, kc * 16 + r, n), "Q/dO rows", D, buf, kc * 16 + r, n);
    }
  }
  for (int wg = 0; wg < kN / 64; ++wg) {
    const uint32_t my_ds = ds + static_cast<uint32_t>(wg * 64 * kM * 2);
    for (int kc = 0; kc < 4; ++kc) {
      const Desc a = decode(Descs::ds(my_ds, kc));  // A of dQ = dS K, M-major: (query m, key r)
      for (int r = 0; r < 16; ++r)
        for (int m = 0; m < kM; ++m)
          expect(nmajor_read(a, r, m), stored<kM>(my_ds, 64, kc * 16 + r, m), "dS^T", D, wg, kc * 16 + r, m);
      for (int chunk = 0; chunk < D / kPN; ++chunk) {  // B of the same, one part of the columns
        const Desc b = decode(Descs::keys_n(k, wg, kc, chunk));
        for (int r = 0; r < 16; ++r)
          for (int n = 0; n < kPN; ++n)
            expect(nmajor_read(b, r, n), stored<D>(k, kN, wg * 64 + kc * 16 + r, chunk * kPN + n), "K for dQ", D,
                   wg, kc * 16 + r, chunk * kPN + n);
      }
    }
  }
}

}  // namespace

int main() {
  check<64, 128, 128>();
  check<64, 128, 64>();
  check<64, 192, 128>();
  check<32, 128, 128>();
  check<32, 128, 64>();
  check<128, 128, 128>();
  check<128, 128, 64>();
  check_backward<64, 128, 64>();
  check_backward<64, 64, 64>();
  check_backward<32, 128, 64>();
  check_backward<128, 64, 64>();
  check_backward<128, 128, 64>();
  std::printf(mismatches ? "%d mismatches\n" : "every operand element is where the instruction reads it\n", mismatches);
  return mismatches ? 1 : 0;
}
