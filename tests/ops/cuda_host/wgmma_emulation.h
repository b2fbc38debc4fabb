// Runs the Hopper wgmma attention kernels (csrc/cuda/attention_wgmma.cuh,
// attention_wgmma_bwd.cuh) on the CPU: include this before them and compile
// with a host compiler. Every CUDA thread of a CTA is a std::thread; the
// kernels' source is unchanged, only the PTX wrappers they call (guarded by
// SGDM_HOST_EMULATION in the headers) are replaced here:
// - wgmma.mma_async: the warpgroup's 128 threads meet; one of them computes
//   the 64 x N x 16 product, reading shared-memory operands through their
//   descriptors by the PTX ISA's canonical layouts (wgmma_canonical.h) and
//   the A operand of the register form from the 128 threads' fragments, and
//   writes every thread's accumulators by the ISA's fragment layout (row
//   16 warp + lane / 4 (+ 8), columns 8 i + 2 (lane % 4) (+ 1)). It runs at
//   issue or, with sgdm_emu::deferred, at the wait that covers it: the two
//   ends of what the hardware may do, so a kernel that touches an operand or
//   an accumulator between issue and wait gets different results.
// - cp.async: a copy (zero-fill past the end) made at issue or, with
//   sgdm_emu::late_copies, at the cp.async.wait_group that covers it: at
//   issue, a copy into a buffer that is still being read shows; at the wait,
//   a read of a tile before the wait for its group.
// - fence.proxy.async: publishes shared memory to the async proxy (a copy
//   the wgmma's operands are checked against: an operand element that
//   differs from what the last fence published was written, by a cp.async or
//   a store, without a fence between the write and the wgmma; counted in
//   sgdm_emu::unpublished_reads). A fence publishes every thread's writes,
//   not only its own: lenient where threads differ, but the kernels' threads
//   all fence at the same points.
// - barriers, warp shuffles and votes: std::barrier over the threads taking part.
// - atomics: std::atomic_ref.
// What this checks: the kernels' own indexing and data flow, the layouts as
// this reading of the ISA has them, and their use of commit and wait. What it
// cannot: the hardware, timing, races between threads beyond the barriers.
// CTAs run one after another, so one shared-memory array serves them all.
// Compile with -fno-strict-aliasing: the kernels pun registers through
// pointers (the CUDA idiom), which a host compiler may otherwise reorder.
#pragma once

#define SGDM_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "wgmma_canonical.h"

#define __launch_bounds__(...)
#undef __shared__
#define __shared__

namespace sgdm_emu {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index thread_idx, block_idx, block_dim;

constexpr int kMaxThreads = 512, kMaxWarps = kMaxThreads / 32, kMaxWarpgroups = kMaxThreads / 128;

// The state of the CTA being run: its barriers and the exchange slots of the collectives.
struct Cta {
  explicit Cta(int threads) : threads(threads), all(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warp_bar.push_back(std::make_unique<std::barrier<>>(32));
    for (int g = 0; g < (threads + 127) / 128; ++g) wg_bar.push_back(std::make_unique<std::barrier<>>(128));
  }
  int threads;
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar, wg_bar;
  std::mutex named_mutex;
  std::unique_ptr<std::barrier<>> named[16];
  float shfl[kMaxWarps][32];
  int vote[kMaxWarps][32];
  float* acc[kMaxWarpgroups][128];        // each thread's accumulators, at a wgmma
  const uint32_t* frag[kMaxWarpgroups][128];  // and its A fragment (register form)

  std::barrier<>& named_barrier(int id, int count) {
    std::lock_guard<std::mutex> lock(named_mutex);
    if (!named[id]) named[id] = std::make_unique<std::barrier<>>(count);
    return *named[id];
  }
};
inline Cta* cta = nullptr;
// false: a wgmma completes when issued; true: when the wgmma.wait_group that
// covers it runs, so that a kernel reading its accumulators, or changing its
// operands, before that wait computes something else.
inline bool deferred = false;
// false: a cp.async copies when issued; true: when the cp.async.wait_group that
// covers its group runs (in the issuing thread, as on the GPU), so that reading a
// tile before waiting for it reads what was there before.
inline bool late_copies = false;

// Operand elements a wgmma read from shared memory that differed from the async
// proxy's view (see fence_proxy_async).
inline std::atomic<long> unpublished_reads{0};

inline int tid() { return static_cast<int>(thread_idx.x); }

// Runs kernel() as grid.x x grid.y CTAs of `threads` threads, one CTA after another.
inline void launch(unsigned grid_x, unsigned grid_y, int threads, const std::function<void()>& kernel) {
  if (threads > kMaxThreads || threads % 32 != 0) std::abort();
  for (unsigned y = 0; y < grid_y; ++y)
    for (unsigned x = 0; x < grid_x; ++x) {
      Cta state(threads);
      cta = &state;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
          thread_idx = {static_cast<unsigned>(t), 0, 0};
          block_idx = {x, y, 0};
          block_dim = {static_cast<unsigned>(threads), 1, 1};
          kernel();
        });
      for (auto& th : pool) th.join();
      cta = nullptr;
    }
}

}  // namespace sgdm_emu

#define threadIdx (sgdm_emu::thread_idx)
#define blockIdx (sgdm_emu::block_idx)
#define blockDim (sgdm_emu::block_dim)

inline void __syncthreads() { sgdm_emu::cta->all.arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const int warp = sgdm_emu::tid() / 32, lane = sgdm_emu::tid() % 32;
  auto& c = *sgdm_emu::cta;
  c.shfl[warp][lane] = v;
  c.warp_bar[warp]->arrive_and_wait();
  const float got = c.shfl[warp][lane ^ lane_mask];
  c.warp_bar[warp]->arrive_and_wait();
  return got;
}
inline int __any_sync(unsigned, int predicate) {
  const int warp = sgdm_emu::tid() / 32, lane = sgdm_emu::tid() % 32;
  auto& c = *sgdm_emu::cta;
  c.vote[warp][lane] = predicate != 0;
  c.warp_bar[warp]->arrive_and_wait();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= c.vote[warp][l];
  c.warp_bar[warp]->arrive_and_wait();
  return any;
}

namespace sgdm::cuda_attn {

// The dynamic shared memory of the CTA being run (the kernels' `extern __shared__ smem_raw`).
namespace wg {
alignas(1024) inline unsigned char smem_raw[232448];
// What the async proxy sees: shared memory as the last fence.proxy.async left it.
alignas(1024) inline unsigned char async_view[sizeof(smem_raw)];
}
inline unsigned char* const emu_smem = wg::smem_raw;

inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - emu_smem);
}
namespace emu {
// One cp.async: `bytes` from src (nullptr: zeros) to dst.
struct Copy {
  void* dst;
  const void* src;
  int bytes;
  void land() const {
    if (src)
      std::memcpy(dst, src, static_cast<size_t>(bytes));
    else
      std::memset(dst, 0, static_cast<size_t>(bytes));
  }
};
// This thread's copies not yet landed (late_copies), by commit group.
struct Copies {
  std::vector<Copy> open;                 // issued since the last commit
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};
inline thread_local Copies copies;
inline void cp_async(void* dst, const void* src, int bytes, bool valid) {
  const Copy copy{dst, valid ? src : nullptr, bytes};
  if (sgdm_emu::late_copies)
    copies.open.push_back(copy);
  else
    copy.land();
}
}  // namespace emu
inline void cp_async_16(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, 16, valid); }
inline void cp_async_4(void* dst, const void* src, bool valid) { emu::cp_async(dst, src, 4, valid); }
inline void cp_async_commit() {
  emu::copies.groups.push_back(std::move(emu::copies.open));
  emu::copies.open.clear();
}
// All but the newest N committed groups land; uncommitted copies stay pending.
template <int N>
inline void cp_async_wait() {
  auto& groups = emu::copies.groups;
  while (groups.size() > static_cast<size_t>(N)) {
    for (const auto& copy : groups.front()) copy.land();
    groups.erase(groups.begin());
  }
}
// Not emulated (the mma.sync kernels run on GPUs); declared for the templates that name them.
void ldmatrix_x4(uint32_t (&r)[4], const void* p);
void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p);
template <class T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
inline void bar_sync(int id, int threads) { sgdm_emu::cta->named_barrier(id, threads).arrive_and_wait(); }
void bar_arrive(int id, int threads);
inline void atomic_add2(float* dst, float x, float y) {
  std::atomic_ref<float>(dst[0]).fetch_add(x);
  std::atomic_ref<float>(dst[1]).fetch_add(y);
}

namespace wg {

// Issued wgmma's of this thread, by commit group: run at issue, or (deferred) at
// the wait that covers them. The thread's warpgroup issues the same sequence, so
// the collective products line up either way.
struct Pending {
  std::vector<std::function<void()>> open;                // issued since the last commit
  std::vector<std::vector<std::function<void()>>> groups;  // committed, oldest first
};
inline thread_local Pending pending;

inline void wgmma_fence() {}
inline void wgmma_commit() {
  if (!sgdm_emu::deferred) return;
  pending.groups.push_back(std::move(pending.open));
  pending.open.clear();
}
template <int N>
inline void wgmma_wait() {
  if (!sgdm_emu::deferred) return;
  if (!pending.open.empty()) std::abort();  // an uncommitted wgmma: the kernel would never wait for it
  while (pending.groups.size() > static_cast<size_t>(N)) {
    for (auto& product : pending.groups.front()) product();
    pending.groups.erase(pending.groups.begin());
  }
}
inline void fence_proxy_async() { std::memcpy(async_view, smem_raw, sizeof(smem_raw)); }
template <class X>
inline void fence_operands(X&) {}

namespace emu {

// A 16-bit element of type T from its bits.
template <class T>
float from_bits(uint16_t bits) {
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  } else {
    const uint32_t wide = uint32_t{bits} << 16;
    float x;
    std::memcpy(&x, &wide, 4);
    return x;
  }
}

template <class T>
float element(uint32_t byte) {
  uint16_t bits, published;
  std::memcpy(&bits, emu_smem + byte, 2);
  std::memcpy(&published, async_view + byte, 2);
  if (bits != published) sgdm_emu::unpublished_reads.fetch_add(1, std::memory_order_relaxed);
  return from_bits<T>(bits);
}

// Accumulator element i of a thread (warp w of the warpgroup, lane): its row and column.
inline int acc_row(int warp, int lane, int i) { return 16 * warp + lane / 4 + 8 * ((i % 4) / 2); }
inline int acc_col(int lane, int i) { return 8 * (i / 4) + 2 * (lane % 4) + i % 2; }

// d (+)= A B for the warpgroup of the calling thread: a(m, k) and b(k, n) give the operands.
template <int N, class A, class B>
void warpgroup_mma(float* d, bool accumulate, const uint32_t* frag, A&& a, B&& b) {
  auto& c = *sgdm_emu::cta;
  const int g = sgdm_emu::tid() / 128, t = sgdm_emu::tid() % 128;
  c.acc[g][t] = d;
  c.frag[g][t] = frag;
  c.wg_bar[g]->arrive_and_wait();
  if (t == 0) {
    static thread_local float am[64][16], bm[16][N];
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) am[m][k] = a(m, k);
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < N; ++n) bm[k][n] = b(k, n);
    for (int th = 0; th < 128; ++th)
      for (int i = 0; i < N / 2; ++i) {
        const int m = acc_row(th / 32, th % 32, i), n = acc_col(th % 32, i);
        float sum = 0.0f;
        for (int k = 0; k < 16; ++k) sum = std::fma(am[m][k], bm[k][n], sum);
        c.acc[g][th][i] = accumulate ? c.acc[g][th][i] + sum : sum;
      }
  }
  c.wg_bar[g]->arrive_and_wait();
}

// The register form's A (m64 x k16, 16-bit): a0 = A[g][2t..], a1 = A[g+8][2t..],
// a2 = A[g][8+2t..], a3 = A[g+8][8+2t..] within each warp's 16 rows (g = lane / 4, t = lane % 4).
template <class T>
float fragment_element(int m, int k) {
  const int warp = m / 16, lane = (m % 8) * 4 + (k % 8) / 2, reg = (m % 16) / 8 + 2 * (k / 8);
  const uint32_t word = sgdm_emu::cta->frag[sgdm_emu::tid() / 128][warp * 32 + lane][reg];
  return from_bits<T>(static_cast<uint16_t>(word >> (16 * (k % 2))));  // the lower half first
}

}  // namespace emu

// Descriptors are read at issue; shared memory, A fragments and accumulators when the product runs.
inline void issue(std::function<void()> product) {
  if (sgdm_emu::deferred)
    pending.open.push_back(std::move(product));
  else
    product();
}

template <class T, int N, bool kAccumulate, bool kMNMajor = false>
void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b) {
  using namespace wgmma_canonical;
  issue([&d, a = decode(desc_a), b = decode(desc_b)] {
    emu::warpgroup_mma<N>(
        d, kAccumulate, nullptr,
        [&](int m, int k) { return emu::element<T>(kMNMajor ? nmajor_read(a, k, m) : kmajor_read(a, m, k)); },
        [&](int k, int n) { return emu::element<T>(kMNMajor ? nmajor_read(b, k, n) : kmajor_read(b, n, k)); });
  });
}

template <class T, int N>
void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  using namespace wgmma_canonical;
  issue([&d, &a, b = decode(desc_b)] {
    emu::warpgroup_mma<N>(
        d, true, a, [](int m, int k) { return emu::fragment_element<T>(m, k); },
        [&](int k, int n) { return emu::element<T>(nmajor_read(b, k, n)); });
  });
}

}  // namespace wg
}  // namespace sgdm::cuda_attn
