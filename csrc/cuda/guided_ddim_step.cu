// Launcher of the guided DDIM step kernel (torch-free; see guided_ddim_step.cuh).
#include <algorithm>

#include "guided_ddim_step.cuh"

namespace sgdm::cuda {
namespace {

template <typename T, bool kUncond, bool kNoise, bool kClip>
void launch(const GuidedDdimArgs& a, cudaStream_t stream) {
  const int64_t tile = static_cast<int64_t>(kDdimThreads) * kDdimUnroll;
  const int64_t blocks_x = std::min<int64_t>((a.per_sample + tile - 1) / tile, 65535);
  const int64_t blocks_y = std::min<int64_t>(a.batch, 65535);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks_x, 1)),
                  static_cast<unsigned>(blocks_y));
  guided_ddim_step_kernel<T, kUncond, kNoise, kClip><<<grid, kDdimThreads, 0, stream>>>(a);
}

template <typename T, bool... kFlags>
void launch_with_flags(const GuidedDdimArgs& a, cudaStream_t stream) {
  constexpr size_t kDone = sizeof...(kFlags);
  if constexpr (kDone == 3) {
    launch<T, kFlags...>(a, stream);
  } else {
    const bool flag = kDone == 0 ? a.eps_uncond != nullptr : kDone == 1 ? a.noise != nullptr : a.clip;
    if (flag) {
      launch_with_flags<T, kFlags..., true>(a, stream);
    } else {
      launch_with_flags<T, kFlags..., false>(a, stream);
    }
  }
}

}  // namespace

cudaError_t launch_guided_ddim_step(const GuidedDdimArgs& args, cudaStream_t stream) {
  if (args.batch == 0 || args.per_sample == 0) return cudaSuccess;
  dispatch_dtype(args.dtype, [&](auto tag) { launch_with_flags<decltype(tag)>(args, stream); });
  return cudaGetLastError();
}

}  // namespace sgdm::cuda
