// Launcher of the guided DDIM step kernel (torch-free; see guided_ddim_step.cuh).
#include <algorithm>

#include "guided_ddim_step.cuh"

namespace sgdm::cuda {
namespace {

// Whether every sample's slice can be walked in 16-byte vectors.
bool vector_ok(const GuidedDdimArgs& a, int vec) {
  return a.per_sample % vec == 0 && aligned16(a.x) && aligned16(a.eps_cond) &&
         aligned16(a.eps_uncond) && aligned16(a.noise) && aligned16(a.x_prev) && aligned16(a.x0);
}

template <typename T, bool kUncond, bool kNoise, bool kClip>
void launch(const GuidedDdimArgs& a, cudaStream_t stream) {
  constexpr int kVec = kVec16<T>;
  const bool vec = vector_ok(a, kVec);
  const int64_t units = vec ? a.per_sample / kVec : a.per_sample;
  const int64_t blocks_x = std::min<int64_t>((units + kDdimThreads - 1) / kDdimThreads, 65535);
  const int64_t blocks_y = std::min<int64_t>(a.batch, 65535);
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(blocks_x, 1)),
                  static_cast<unsigned>(blocks_y));
  if (vec) {
    guided_ddim_step_kernel<T, kVec, kUncond, kNoise, kClip><<<grid, kDdimThreads, 0, stream>>>(a);
  } else {
    guided_ddim_step_kernel<T, 1, kUncond, kNoise, kClip><<<grid, kDdimThreads, 0, stream>>>(a);
  }
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
