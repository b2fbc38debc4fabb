// Tile configurations of the CUDA attention forward, timed against each other.
//
// A standalone program (no torch): it instantiates attention_fwd_mma with the
// production FwdTile<D> and with alternative FwdConfig<D, row tiles per warp,
// warp groups, CTAs per SM>, checks that every alternative gives the
// production output (max |difference| within two 16-bit ulps of the largest
// output, lse within 1e-5 relative), and times them on the same inputs:
// medians of CUDA-event samples of 10 launches, variants interleaved, input
// sets rotated through more than the L2. Use it to retune FwdTile for another
// GPU (benchmarks/RESULTS.md has the H200 numbers behind the current choice).
//
//   nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -arch=sm_90 \
//        -Icsrc/include -Icsrc/cuda benchmarks/attention_tiles.cu -o attention_tiles
//   ./attention_tiles            # exit status 1 when an alternative disagrees
#include "attention_ab.cuh"

using namespace sgdm::cuda_attn;
using namespace sgdm_ab;

namespace {

template <class Cfg>
std::string describe() {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "rows/warp %d, groups %d, CTAs/SM %d", 16 * Cfg::kR, Cfg::kGroups, Cfg::kMinBlocks);
  return buf;
}

// The production FwdTile<D> first, then the alternatives.
template <class T, int D, class... Alts>
bool compare_tiles(int bh, int n, int reps) {
  std::vector<FwdVariant<T>> v{{describe<FwdTile<D>>() + " (FwdTile)", &launch_mma<T, D>}};
  (v.push_back({describe<Alts>(), &launch_mma<T, D, Alts>}), ...);
  return compare<T, D>(v, bh, n, n, reps);
}

}  // namespace

int main() {
  print_device("production time / config time (> 1: the config is faster)");
  using bf16 = __nv_bfloat16;
  bool ok = true;
  ok &= compare_tiles<bf16, 64, FwdConfig<64, 2, 2, 1>, FwdConfig<64, 1, 2, 2>>(64, 1024, 30);
  ok &= compare_tiles<bf16, 64, FwdConfig<64, 2, 2, 1>, FwdConfig<64, 1, 2, 2>>(64, 4096, 20);
  ok &= compare_tiles<bf16, 32, FwdConfig<32, 2, 2, 1>, FwdConfig<32, 1, 2, 2>>(64, 4096, 15);
  ok &= compare_tiles<bf16, 32, FwdConfig<32, 2, 2, 1>, FwdConfig<32, 1, 2, 2>>(64, 1024, 20);
  ok &= compare_tiles<bf16, 128, FwdConfig<128, 1, 1, 2>>(64, 4096, 10);
  ok &= compare_tiles<__half, 64, FwdConfig<64, 2, 2, 1>>(64, 4096, 10);
  std::printf(ok ? "every configuration agrees with FwdTile\n" : "SOME CONFIGURATIONS DISAGREE\n");
  return ok ? 0 : 1;
}
