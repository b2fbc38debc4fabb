// The Hopper wgmma forward (csrc/cuda/attention_wgmma.cuh) against the
// production mma.sync forward (attention_fwd.cuh, FwdTile<D>): agreement, then
// time, on the same inputs (benchmarks/attention_ab.cuh). The wgmma kernel
// has not run on a GPU before this program: a disagreement is a bug in it,
// and the program exits 1.
//
//   nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -arch=sm_90a \
//        -Icsrc/include -Icsrc/cuda benchmarks/attention_wgmma.cu -o attention_wgmma
//   ./attention_wgmma            # needs an H100 / H200; exit status 1 on a disagreement
#include "attention_ab.cuh"
#include "attention_wgmma.cuh"

using namespace sgdm::cuda_attn;
using namespace sgdm_ab;

namespace {

template <class T, int D, class Cfg>
void launch_wgmma(const T* q, const T* k, const T* v, T* o, float* lse, int bh, int nq, int nk, float scale) {
  constexpr int smem = Cfg::template smem_bytes<T>();
  CHECK_CUDA(cudaFuncSetAttribute(&wg::attention_fwd_wgmma<T, D, Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  smem));
  wg::attention_fwd_wgmma<T, D, Cfg><<<dim3((nq + Cfg::kM - 1) / Cfg::kM, bh), Cfg::kThreads, smem>>>(
      q, k, v, o, lse, nq, nk, scale * kLog2e);
  CHECK_CUDA(cudaGetLastError());
}

template <class Cfg>
std::string describe() {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "wgmma: keys/block %d, warpgroups %d, CTAs/SM %d%s", Cfg::kN, Cfg::kWG,
                Cfg::kMinBlocks, Cfg::kOverlap ? ", overlap" : "");
  return buf;
}

// The production mma.sync kernel first, then the wgmma configurations.
template <class T, int D, class... Cfgs>
bool compare_wgmma(int bh, int nq, int nk, int reps) {
  std::vector<FwdVariant<T>> v{{"mma.sync FwdTile (production)", &launch_mma<T, D>}};
  (v.push_back({describe<Cfgs>(), &launch_wgmma<T, D, Cfgs>}), ...);
  return compare<T, D>(v, bh, nq, nk, reps);
}

}  // namespace

int main() {
  const cudaDeviceProp prop = print_device("mma.sync time / wgmma time (> 1: wgmma is faster)");
  if (prop.major != 9) {
    std::printf("needs compute capability 9.x (wgmma), this GPU is %d.%d\n", prop.major, prop.minor);
    return 2;
  }
  using bf16 = __nv_bfloat16;
  using namespace sgdm::cuda_attn::wg;
  bool ok = true;
  // Correctness first: key and query counts that are not multiples of the tiles, one and several key blocks.
  using D64 = WgConfig<64, 128, 2, 1>;
  using D64o = WgConfig<64, 128, 2, 1, true>;
  using D64n = WgConfig<64, 64, 2, 2>;
  using D64no = WgConfig<64, 64, 2, 1, true>;
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(3, 77, 77, 3);
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(5, 1000, 1000, 3);
  ok &= compare_wgmma<bf16, 32, WgConfig<32, 128, 2, 1>, WgConfig<32, 128, 2, 1, true>>(5, 1000, 1000, 3);
  ok &= compare_wgmma<bf16, 128, WgConfig<128, 128, 2, 1>, WgConfig<128, 128, 2, 1, true>>(5, 1000, 1000, 3);
  ok &= compare_wgmma<__half, 64, D64, D64o>(5, 1000, 1000, 3);
  // Cross-attention: queries and keys of different counts, a single partial key block and several.
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(4, 1000, 77, 3);
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no>(4, 33, 600, 3);
  if (!ok) {
    std::printf("THE WGMMA KERNEL DISAGREES: no timings\n");
    return 1;
  }
  // The issue's shapes (bf16, B*H = 64, D = 64), then the ImageNet configs' D = 32 and D = 128.
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no, WgConfig<64, 128, 3, 1>>(64, 1024, 1024, 30);
  ok &= compare_wgmma<bf16, 64, D64, D64o, D64n, D64no, WgConfig<64, 128, 3, 1>>(64, 4096, 4096, 20);
  ok &= compare_wgmma<bf16, 32, WgConfig<32, 128, 2, 1>, WgConfig<32, 128, 2, 1, true>, WgConfig<32, 64, 2, 2>>(
      64, 4096, 4096, 15);
  ok &= compare_wgmma<bf16, 128, WgConfig<128, 128, 2, 1>, WgConfig<128, 128, 2, 1, true>, WgConfig<128, 64, 2, 1>>(
      64, 4096, 4096, 10);
  std::printf(ok ? "the wgmma kernel agrees with the production kernel\n" : "THE WGMMA KERNEL DISAGREES\n");
  return ok ? 0 : 1;
}
