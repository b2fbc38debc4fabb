// Hopper (sm_90a) forward of flash attention on warpgroup MMAs, and the
// wgmma building blocks the backward (attention_wgmma_bwd.cuh) shares. The
// extension runs them on a compute capability 9.0 GPU with a 9.0a build
// (attention_hopper.cu picks the configuration; SGDM_ATTENTION_WGMMA=0 turns
// them off).
//
// STATUS: first run on an H200 on 2026-11-28 (benchmarks/RESULTS.md): every
// configuration of benchmarks/attention_wgmma.cu agreed with the mma.sync
// kernel, and the op tests, memcheck and racecheck passed with it. Without a
// GPU, tests/ops/test_attention_ab_programs.py builds
// benchmarks/attention_wgmma.cu and attention_hopper.cu for sm_90a (warnings
// as errors, no stack frame, no serialized wgmma), checks on the CPU that
// every operand descriptor reads the elements the tiles hold
// (tests/ops/cuda_host/wgmma_layouts.cu, against the PTX ISA's canonical
// layouts), and runs this kernel, source unchanged, in a CPU emulation of
// its PTX (tests/ops/cuda_host/wgmma_emulator.cpp) against float64
// attention. On an H100 / H200, benchmarks/attention_wgmma.cu checks it
// against the mma.sync kernel (attention_fwd.cuh) and times both.
//
// Why: the mma.sync forward reaches 279 TFLOP/s on an H200 (bf16, D = 64,
// N = 4096), 0.59x cuDNN, which uses wgmma. A warpgroup MMA reads both
// operands of S = Q K^T straight from shared memory (no ldmatrix, no
// registers for K), and one instruction covers a 64 x N x 16 product, so the
// issue slots and shared-memory reads per FLOP fall.
//
// Layout. A CTA holds kWG warpgroups (128 threads each), 64 query rows per
// warpgroup, and streams kN-key blocks of K and V, double buffered with
// cp.async, shared by all warpgroups. Tiles are stored in the canonical
// swizzled layout of wgmma (PTX ISA 9.7.15.5.1.2): rows of min(2 D, 128)
// bytes, 16-byte units XOR-ed with the row index mod 8 (Swizzle<3,4,3> on
// byte offsets; 64-byte rows for D = 32 use Swizzle<2,4,3>), a head dim wider
// than 64 split into 64-column chunks, each a [rows][64] tile of its own.
// - S = Q K^T: m64n{kN}k16, A = Q and B = K both K-major from shared memory.
// - O += P V: m64n{D}k16, A = P from registers (the accumulator layout of S,
//   converted to 16 bit, is the A fragment layout, as with mma.sync), B = V
//   "N-major" (transposed) from shared memory, as it is stored [keys][D].
// The softmax is the mma.sync kernel's (fwd_softmax_block in
// attention_fwd.cuh): a warpgroup's accumulator is, per warp, the same
// m16n8 tiles that mma.sync produces.
//
// Version 1 runs S, softmax and P V one after the other within a
// warpgroup; overlap comes from the other warpgroups and CTAs on the SM.
// FlashAttention-3's intra-warpgroup pipelining (issue S(j + 1) before the
// softmax of j) and a TMA producer warp are the next steps once this is
// proven.
#pragma once

#include <cstdint>

#include "attention_fwd.cuh"

// The wgmma instructions assemble for sm_90a only (-gencode
// arch=compute_90a,code=sm_90a); attention_fwd_wgmma compiles to a trap elsewhere.

namespace sgdm::cuda_attn::wg {

// ---- PTX wrappers -------------------------------------------------------
// (tests/ops/cuda_host/wgmma_emulation.h replaces them on the host, where the
// kernels run on the CPU against the PTX ISA's layouts)
#if !defined(SGDM_HOST_EMULATION)

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Generic-proxy writes to shared memory (cp.async, st.shared) become visible
// to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pins accumulator registers in place around wgmma issue and wait, so the
// compiler moves no read or write of them across (CUTLASS's
// warpgroup_fence_operand).
template <int n>
__device__ __forceinline__ void fence_operands(float (&x)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(x[i])::"memory");
}
template <int n>
__device__ __forceinline__ void fence_operands(uint64_t (&x)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+l"(x[i])::"memory");
}
template <int n>
__device__ __forceinline__ void fence_operands(uint32_t (&x)[n][4]) {
#pragma unroll
  for (int i = 0; i < n; ++i)
    asm volatile("" : "+r"(x[i][0]), "+r"(x[i][1]), "+r"(x[i][2]), "+r"(x[i][3])::"memory");
}

// d = a b (kAccumulate = false) or d += a b; m64nNk16, A and B in shared memory,
// both K-major, or with kMNMajor both M- / N-major (transposed).
template <class T, int N, bool kAccumulate, bool kMNMajor = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b);
// d += a b; m64nNk16, A in registers, B N-major (transposed) in shared memory.
template <class T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b);

// Operand lists: %0.. for the R = N / 2 accumulators of a thread.
#define SGDM_WG_REGS16 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define SGDM_WG_REGS32 SGDM_WG_REGS16 "," \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define SGDM_WG_REGS64 SGDM_WG_REGS32 "," \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47," \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define SGDM_WG_ACC16(c) \
  c(d[0]), c(d[1]), c(d[2]), c(d[3]), c(d[4]), c(d[5]), c(d[6]), c(d[7]), \
  c(d[8]), c(d[9]), c(d[10]), c(d[11]), c(d[12]), c(d[13]), c(d[14]), c(d[15])
#define SGDM_WG_ACC32(c) SGDM_WG_ACC16(c), \
  c(d[16]), c(d[17]), c(d[18]), c(d[19]), c(d[20]), c(d[21]), c(d[22]), c(d[23]), \
  c(d[24]), c(d[25]), c(d[26]), c(d[27]), c(d[28]), c(d[29]), c(d[30]), c(d[31])
#define SGDM_WG_ACC64(c) SGDM_WG_ACC32(c), \
  c(d[32]), c(d[33]), c(d[34]), c(d[35]), c(d[36]), c(d[37]), c(d[38]), c(d[39]), \
  c(d[40]), c(d[41]), c(d[42]), c(d[43]), c(d[44]), c(d[45]), c(d[46]), c(d[47]), \
  c(d[48]), c(d[49]), c(d[50]), c(d[51]), c(d[52]), c(d[53]), c(d[54]), c(d[55]), \
  c(d[56]), c(d[57]), c(d[58]), c(d[59]), c(d[60]), c(d[61]), c(d[62]), c(d[63])
#define SGDM_WG_OUT(x) "=f"(x)
#define SGDM_WG_INOUT(x) "+f"(x)

// R accumulators; the descriptors are operands A and B, the scale-d flag P;
// TR: the transpose flags of A and B ("0, 0": K-major, "1, 1": MN-major).
#define SGDM_WGMMA_SS(T, TY, N, R, A, B, P, ACC, MODE, MN, TR)                                                  \
  template <>                                                                                                 \
  __device__ __forceinline__ void wgmma_ss<T, N, ACC, MN>(float (&d)[R], uint64_t desc_a, uint64_t desc_b) {  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                            \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" SGDM_WG_REGS##R "}, %" #A    \
                 ", %" #B ", p, 1, 1, " TR ";\n}\n"                                                           \
                 : SGDM_WG_ACC##R(MODE)                                                                       \
                 : "l"(desc_a), "l"(desc_b), "n"(static_cast<int>(ACC)));                                     \
  }
// R accumulators; A fragments A0..A3, descriptor B, scale-d flag P.
#define SGDM_WGMMA_RS(T, TY, N, R, A0, A1, A2, A3, B, P)                                                      \
  template <>                                                                                               \
  __device__ __forceinline__ void wgmma_rs<T, N>(float (&d)[R], const uint32_t (&a)[4], uint64_t desc_b) {  \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                                          \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" SGDM_WG_REGS##R "}, {%" #A0 \
                 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 1;\n}\n"                               \
                 : SGDM_WG_ACC##R(SGDM_WG_INOUT)                                                            \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(1));                        \
  }

#define SGDM_WGMMA_SS_BOTH(T, TY, N, R, A, B, P, MN, TR)              \
  SGDM_WGMMA_SS(T, TY, N, R, A, B, P, false, SGDM_WG_OUT, MN, TR)     \
  SGDM_WGMMA_SS(T, TY, N, R, A, B, P, true, SGDM_WG_INOUT, MN, TR)
#define SGDM_WGMMA_TYPE(T, TY)                                         \
  SGDM_WGMMA_SS_BOTH(T, TY, 64, 32, 32, 33, 34, false, "0, 0")         \
  SGDM_WGMMA_SS_BOTH(T, TY, 128, 64, 64, 65, 66, false, "0, 0")        \
  SGDM_WGMMA_SS_BOTH(T, TY, 32, 16, 16, 17, 18, true, "1, 1")          \
  SGDM_WGMMA_SS_BOTH(T, TY, 64, 32, 32, 33, 34, true, "1, 1")          \
  SGDM_WGMMA_SS_BOTH(T, TY, 128, 64, 64, 65, 66, true, "1, 1")         \
  SGDM_WGMMA_RS(T, TY, 32, 16, 16, 17, 18, 19, 20, 21)                 \
  SGDM_WGMMA_RS(T, TY, 64, 32, 32, 33, 34, 35, 36, 37)                 \
  SGDM_WGMMA_RS(T, TY, 128, 64, 64, 65, 66, 67, 68, 69)
SGDM_WGMMA_TYPE(__nv_bfloat16, "bf16")
SGDM_WGMMA_TYPE(__half, "f16")

#undef SGDM_WGMMA_TYPE
#undef SGDM_WGMMA_RS
#undef SGDM_WGMMA_SS_BOTH
#undef SGDM_WGMMA_SS
#undef SGDM_WG_INOUT
#undef SGDM_WG_OUT
#undef SGDM_WG_ACC64
#undef SGDM_WG_ACC32
#undef SGDM_WG_ACC16
#undef SGDM_WG_REGS64
#undef SGDM_WG_REGS32
#undef SGDM_WG_REGS16
#endif  // !SGDM_HOST_EMULATION

// ---- shared-memory tiles and their descriptors ----------------------------

// The swizzled layout of a [rows][D] tile of 16-bit elements (rows a multiple of 8).
template <int D>
struct Swizzle {
  static constexpr int kBytes = D * 2 >= 128 ? 128 : D * 2;  // bytes of a row within one chunk
  static constexpr int kCols = kBytes / 2;                   // columns per chunk
  static constexpr int kAtomBytes = 8 * kBytes;              // 8 rows: the descriptors' stride, and the alignment
  static constexpr uint64_t kMode = kBytes == 128 ? 1 : kBytes == 64 ? 2 : 3;
  static_assert(D % kCols == 0 && kBytes >= 32, "head dim 32, 64 or a multiple of 64");

  // Byte offset of element (r, c); c a multiple of 8 (16-byte units).
  static __host__ __device__ __forceinline__ uint32_t offset(int rows, int r, int c) {
    const uint32_t lin = static_cast<uint32_t>(((c / kCols) * rows + r) * kBytes + (c % kCols) * 2);
    return lin ^ (((lin >> 7) & (kBytes / 16 - 1)) << 4);
  }
};

__host__ __device__ __forceinline__ uint64_t desc_field(uint32_t bytes) { return (bytes & 0x3FFFFu) >> 4; }

// Operand in K-major layout starting at shared address `addr`: the leading
// offset is unused with swizzling (1 by convention), the stride is 8 rows.
template <int D>
__host__ __device__ __forceinline__ uint64_t kmajor_desc(uint32_t addr) {
  using Sw = Swizzle<D>;
  return desc_field(addr) | (uint64_t{1} << 16) | (desc_field(Sw::kAtomBytes) << 32) | (Sw::kMode << 62);
}
// Operand B in N-major layout (a [keys][D] tile used as K x N; or A in
// M-major layout, a [K][M] tile): the leading offset steps to the next chunk
// of columns (N or M), the stride to the next 8 rows (K).
template <int D>
__host__ __device__ __forceinline__ uint64_t nmajor_desc(uint32_t addr, int rows) {
  using Sw = Swizzle<D>;
  return desc_field(addr) | (desc_field(static_cast<uint32_t>(rows * Sw::kBytes)) << 16) |
         (desc_field(Sw::kAtomBytes) << 32) | (Sw::kMode << 62);
}

// The kernel's wgmma operands as descriptors, from the shared-memory byte
// addresses of its tiles (Q: kM rows, K and V: kN rows, each in the layout
// of Swizzle<D>). tests/ops/test_attention_ab_programs.py decodes them on the
// host with the PTX ISA's canonical layouts and checks that every element an
// instruction reads is the one the tile holds there.
template <int D, int kM, int kN>
struct OperandDescs {
  using Sw = Swizzle<D>;
  // A of S = Q K^T: query rows 64 wg .. 64 wg + 63, head-dim columns 16 kk .. 16 kk + 15.
  static __host__ __device__ __forceinline__ uint64_t q(uint32_t tile, int wg, int kk) {
    const int c = kk * 16;
    return kmajor_desc<D>(tile + static_cast<uint32_t>(((c / Sw::kCols) * kM + wg * 64) * Sw::kBytes +
                                                       (c % Sw::kCols) * 2));
  }
  // B of S = Q K^T: all kN keys, head-dim columns 16 kk .. 16 kk + 15.
  static __host__ __device__ __forceinline__ uint64_t k(uint32_t tile, int kk) {
    const int c = kk * 16;
    return kmajor_desc<D>(tile + static_cast<uint32_t>((c / Sw::kCols) * kN * Sw::kBytes + (c % Sw::kCols) * 2));
  }
  // B of O += P V: keys 16 kc .. 16 kc + 15, all D columns.
  static __host__ __device__ __forceinline__ uint64_t v(uint32_t tile, int kc) {
    return nmajor_desc<D>(tile + static_cast<uint32_t>(kc * 16 * Sw::kBytes), kN);
  }
};

// Copies a [kRows][D] tile (row stride D in global memory) into the swizzled
// layout; rows at or past `valid_rows` become zeros.
template <class T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_swizzled(unsigned char* tile, const T* gmem, int valid_rows, int tid) {
  constexpr int kUnits = D / 8;
#pragma unroll 4
  for (int i = tid; i < kRows * kUnits; i += kThreads) {
    const int r = i / kUnits, c = (i % kUnits) * 8;
    const bool valid = r < valid_rows;
    cp_async_16(tile + Swizzle<D>::offset(kRows, r, c), gmem + (valid ? static_cast<int64_t>(r) * D + c : 0), valid);
  }
}

// ---- the kernel ------------------------------------------------------------

// All but the newest kPending copy groups of every thread are complete and
// visible to wgmma's async proxy, in every warpgroup.
template <int kPending>
__device__ __forceinline__ void copies_landed() {
  cp_async_wait<kPending>();
  fence_proxy_async();
  __syncthreads();
}

// kN keys per block, kWG warpgroups (64 query rows each) per CTA, kMinBlocks
// CTAs per SM for the register budget. kOverlap: within a warpgroup, the
// softmax of block j runs while the tensor cores do P(j-1) V(j-1)
// (FlashAttention-3's intra-warpgroup pipelining; a second set of P
// registers, and the rescale of O deferred until that product is done).
template <int D, int kN_, int kWG_, int kMinBlocks_, bool kOverlap_ = false>
struct WgConfig {
  static_assert(kN_ == 64 || kN_ == 128, "key block of 64 or 128");
  static constexpr int kN = kN_, kWG = kWG_, kMinBlocks = kMinBlocks_;
  static constexpr bool kOverlap = kOverlap_;
  static constexpr int kM = 64 * kWG, kThreads = 128 * kWG;
  template <class T>
  static constexpr int smem_bytes() {  // Q, 2 x K, 2 x V, and room to align the base to 1024 bytes
    return (kM + 4 * kN) * D * static_cast<int>(sizeof(T)) + 1024;
  }
};

// The body of attention_fwd_wgmma (below).
template <class T, int D, class Cfg>
__device__ __forceinline__ void fwd_wgmma_cta(const T* __restrict__ q, const T* __restrict__ k,
                                              const T* __restrict__ v, T* __restrict__ out,
                                              float* __restrict__ lse, int nq, int nk, float scale_log2) {
  constexpr int kN = Cfg::kN, kM = Cfg::kM, kNT = kN / 8, kDT = D / 8;
  constexpr int kTileBytes = kN * D * static_cast<int>(sizeof(T));
  const int tid = static_cast<int>(threadIdx.x), wgi = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int m0 = static_cast<int>(blockIdx.x) * kM;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t pad = ((raw + 1023u) & ~1023u) - raw;
  unsigned char* sq = smem_raw + pad;
  unsigned char* sk = sq + kM * D * static_cast<int>(sizeof(T));
  unsigned char* sv = sk + 2 * kTileBytes;
  const uint32_t aq = raw + pad, ak = smem_addr(sk), av = smem_addr(sv);

  const int64_t bh = blockIdx.y;
  const T* kg = k + bh * nk * D;
  const T* vg = v + bh * nk * D;
  const int n_blocks = (nk + kN - 1) / kN;
  // K or V of key block j into buffer j % 2 (nothing past the last block).
  auto load_k = [&](int j) {
    if (j < n_blocks)
      load_swizzled<T, D, kN, Cfg::kThreads>(sk + (j & 1) * kTileBytes, kg + static_cast<int64_t>(j) * kN * D,
                                             nk - j * kN, tid);
  };
  auto load_v = [&](int j) {
    if (j < n_blocks)
      load_swizzled<T, D, kN, Cfg::kThreads>(sv + (j & 1) * kTileBytes, vg + static_cast<int64_t>(j) * kN * D,
                                             nk - j * kN, tid);
  };

  using Descs = OperandDescs<D, kM, kN>;
  auto q_desc = [&](int kk) { return Descs::q(aq, wgi, kk); };
  auto k_desc = [&](int j, int kk) { return Descs::k(ak + static_cast<uint32_t>((j & 1) * kTileBytes), kk); };
  auto v_desc = [&](int j, int kc) { return Descs::v(av + static_cast<uint32_t>((j & 1) * kTileBytes), kc); };

  // Per thread, as m16n8 accumulator tiles (warp w of the warpgroup holds rows 16 w .. 16 w + 15).
  float s[1][kNT][4];
  float acc[1][kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc[0][i][0] = acc[0][i][1] = acc[0][i][2] = acc[0][i][3] = 0.0f;
  attn::OnlineRow row[1][2] = {{attn::online_init(), attn::online_init()}};
  uint32_t pf[1][kN / 16][4];
  float (&s_flat)[kN / 2] = reinterpret_cast<float (&)[kN / 2]>(s);
  float (&acc_flat)[D / 2] = reinterpret_cast<float (&)[D / 2]>(acc);
  const bool neg = scale_log2 < 0.0f;
  const float masked = neg ? attn::pos_infinity() : attn::neg_infinity();

  // ready_s / ready_pv compute every register an MMA reads or writes,
  // descriptors included, and pin it (fence_operands) before the wgmma.fence
  // that precedes the MMAs; it is touched again only after the wait that
  // covers them: an instruction defining one in between makes ptxas serialize
  // every wgmma of the kernel. mma_s / mma_pv issue one commit group each.
  uint64_t qd[D / 16], kd[D / 16], vd[kN / 16];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) qd[kk] = q_desc(kk);
  auto ready_s = [&](int j) {  // for S(j)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) kd[kk] = k_desc(j, kk);
    fence_operands(qd);
    fence_operands(kd);  // not s: its first MMA only writes it, so it is not carried across blocks
  };
  auto ready_pv = [&](int j, uint32_t (&p)[1][kN / 16][4]) {  // for P V(j)
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) vd[kc] = v_desc(j, kc);
    fence_operands(vd);
    fence_operands(acc_flat);
    fence_operands(p[0]);
  };
  auto mma_s = [&] {  // S = Q K^T with the descriptors settled
    wgmma_ss<T, kN, false>(s_flat, qd[0], kd[0]);
#pragma unroll
    for (int kk = 1; kk < D / 16; ++kk) wgmma_ss<T, kN, true>(s_flat, qd[kk], kd[kk]);
    wgmma_commit();
  };
  auto mma_pv = [&](uint32_t (&p)[1][kN / 16][4]) {  // O += P V
#pragma unroll
    for (int kc = 0; kc < kN / 16; ++kc) wgmma_rs<T, D>(acc_flat, p[0][kc], vd[kc]);
    wgmma_commit();
  };
  auto rescale_now = [&](int r, int h, float alpha) { scale_rows(acc[r], h, alpha); };

  load_swizzled<T, D, kM, Cfg::kThreads>(sq, q + (bh * nq + m0) * D, nq - m0, tid);
  load_k(0);
  cp_async_commit();
  load_v(0);
  cp_async_commit();

  if constexpr (!Cfg::kOverlap) {
    // S, softmax, P V one after the other. Copy groups: [Q K0], [V0], then [K(j+1) V(j+1)] per block.
    for (int j = 0; j < n_blocks; ++j) {
      copies_landed<0>();  // block j; every warpgroup is done with block j - 1
      load_k(j + 1);
      load_v(j + 1);
      cp_async_commit();
      ready_s(j);
      wgmma_fence();
      mma_s();
      wgmma_wait<0>();
      fence_operands(s_flat);
      fwd_softmax_block<T>(s, row, pf, (j + 1) * kN > nk, j * kN, nk, scale_log2, neg, masked, lane, rescale_now);
      ready_pv(j, pf);
      wgmma_fence();
      mma_pv(pf);
      wgmma_wait<0>();
      fence_operands(acc_flat);
    }
  } else {
    // Block 0 alone, then per block j >= 1: S(j) and P(j-1) V(j-1) in flight together, the
    // softmax of j once S(j) is done, the rescale of O once P(j-1) V(j-1) is. Copy groups:
    // [Q K0], [V0], [K1], [V1], then per block [K(j+1)] at its start and [V(j+1)] at its end,
    // so at the start of block j only the newest group, V(j), may still be in flight.
    // P alternates between pf and pn: P(j) is written while P(j-1) feeds the tensor cores, and
    // no instruction copies P (a copy into registers an MMA reads makes ptxas serialize them).
    uint32_t pn[1][kN / 16][4];
    copies_landed<1>();  // Q, K0
    load_k(1);
    cp_async_commit();
    load_v(1);
    cp_async_commit();
    ready_s(0);
    wgmma_fence();
    mma_s();
    wgmma_wait<0>();
    fence_operands(s_flat);
    fwd_softmax_block<T>(s, row, pf, kN > nk, 0, nk, scale_log2, neg, masked, lane, rescale_now);  // O is still 0
    // Block j >= 1: P(j-1) is in `prev`, P(j) goes to `next`.
    auto block = [&](int j, uint32_t (&prev)[1][kN / 16][4], uint32_t (&next)[1][kN / 16][4]) {
      copies_landed<1>();  // K(j) and V(j-1); every warpgroup is done with K(j-1)
      load_k(j + 1);
      cp_async_commit();
      ready_s(j);
      ready_pv(j - 1, prev);
      wgmma_fence();  // one fence for both groups: nothing may define their registers while either runs
      mma_s();
      mma_pv(prev);
      wgmma_wait<1>();  // S(j) is done; P(j-1) V(j-1) may still run
      fence_operands(s_flat);
      float alpha[2] = {1.0f, 1.0f};
      bool moved = false;
      fwd_softmax_block<T>(s, row, next, (j + 1) * kN > nk, j * kN, nk, scale_log2, neg, masked, lane,
                           [&](int, int h, float a) {
                             alpha[h] = a;
                             moved = true;
                           });
      wgmma_wait<0>();
      fence_operands(acc_flat);
      if (moved) {  // warp-uniform
        scale_rows(acc[0], 0, alpha[0]);
        scale_rows(acc[0], 1, alpha[1]);
      }
      __syncthreads();  // every warpgroup is done with V(j-1): its buffer takes V(j+1)
      load_v(j + 1);
      cp_async_commit();
    };
    for (int j = 1; j < n_blocks; j += 2) {
      block(j, pf, pn);
      if (j + 1 < n_blocks) block(j + 1, pn, pf);
    }
    copies_landed<0>();  // V(n-1)
    if (n_blocks % 2 == 1) {  // P(n-1) is in pf
      ready_pv(n_blocks - 1, pf);
      wgmma_fence();
      mma_pv(pf);
    } else {
      ready_pv(n_blocks - 1, pn);
      wgmma_fence();
      mma_pv(pn);
    }
    wgmma_wait<0>();
    fence_operands(acc_flat);
  }

  fwd_store_rows<T, D>(acc, row, out, lse, bh, nq, m0, wgi * 4 + warp, lane);
}

// Same contract as attention_fwd_mma (scale_log2 = scale * log2(e), nonzero).
// wgmma exists only in sm_90a code: compiled for any other target (an
// extension built for "8.0;9.0a" compiles it for sm_80 too) the kernel traps,
// and the host launches it only on a 9.0 GPU of a build with sm_90a
// (attention_forward_wgmma in attention_hopper.cu).
template <class T, int D, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    attention_fwd_wgmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        T* __restrict__ out, float* __restrict__ lse, int nq, int nk, float scale_log2) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();
#else
  fwd_wgmma_cta<T, D, Cfg>(q, k, v, out, lse, nq, nk, scale_log2);
#endif
}

}  // namespace sgdm::cuda_attn::wg
