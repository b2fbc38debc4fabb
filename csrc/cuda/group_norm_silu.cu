// Launchers of the GroupNorm(+SiLU) kernels (torch-free; see group_norm_silu.cuh).
#include <cstdint>

#include "group_norm_silu.cuh"

namespace sgdm::cuda {
namespace {

// Within-group indices are 32-bit; the group count is the grid size.
bool fits(const GroupNormShape& s) {
  const int64_t group = (s.c / s.groups) * s.hw;
  return group < (int64_t{1} << 31) && s.n * s.groups < (int64_t{1} << 31);
}

// The kernels' static reduction scratch (at most 32 Welford triples of doubles),
// which counts toward the 48 KiB a block gets without opting in.
constexpr size_t kStaticSmemBound = kWarp * sizeof(WelfordData<double>);

template <typename Kernel, typename Args>
cudaError_t launch(Kernel kernel, const Args& a, size_t smem, cudaStream_t stream) {
  if (smem + kStaticSmemBound > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(a.s.n * a.s.groups), kGnThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// Whether NCHW tensors can be walked in 16-byte units of `vec` elements.
bool vector_ok(const GroupNormFwdArgs& a, int vec) {
  return !a.s.channels_last && a.s.hw % vec == 0 && aligned16(a.x) && aligned16(a.y);
}
bool vector_ok(const GroupNormBwdArgs& a, int vec) {
  return !a.s.channels_last && a.s.hw % vec == 0 && aligned16(a.x) && aligned16(a.grad_y) &&
         aligned16(a.grad_x);
}

// Per-channel arrays of C/G values in dynamic shared memory: scale and shift
// (forward); gamma, beta and the two sums (backward).
constexpr int kFwdArrays = 2, kBwdArrays = 4;

size_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Picks the kernel instance for (dtype, layout, activation, vector width).
template <template <typename, bool, bool, int> class Pick, typename Args>
cudaError_t dispatch(const Args& a, int smem_arrays, cudaStream_t stream) {
  if (a.s.n * a.s.groups == 0 || a.s.hw == 0) return cudaSuccess;
  if (!fits(a.s)) return cudaErrorInvalidValue;
  cudaError_t err = cudaSuccess;
  dispatch_dtype(a.s.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = kVec16<T>;
    const size_t smem = static_cast<size_t>(smem_arrays) * (a.s.c / a.s.groups) * acc_bytes(a.s.dtype);
    if (a.s.channels_last) {
      err = a.s.silu ? launch(Pick<T, true, true, 1>::kernel(a), a, smem, stream)
                     : launch(Pick<T, true, false, 1>::kernel(a), a, smem, stream);
    } else if (vector_ok(a, kVec)) {
      err = a.s.silu ? launch(Pick<T, false, true, kVec>::kernel(a), a, smem, stream)
                     : launch(Pick<T, false, false, kVec>::kernel(a), a, smem, stream);
    } else {
      err = a.s.silu ? launch(Pick<T, false, true, 1>::kernel(a), a, smem, stream)
                     : launch(Pick<T, false, false, 1>::kernel(a), a, smem, stream);
    }
  });
  return err;
}

// The forward keeps the group in registers when it fits (gn_cache_units).
template <typename T, bool kCL, bool kSilu, int kVec>
struct Fwd {
  static auto kernel(const GroupNormFwdArgs& a) {
    constexpr int kCache = gn_cache_units<T, kVec>();
    const int64_t units = (a.s.c / a.s.groups) * a.s.hw / kVec;
    if constexpr (kCache > 0) {
      if (units <= int64_t{kGnThreads} * kCache) return &group_norm_silu_fwd_kernel<T, kCL, kSilu, kVec, true>;
    }
    return &group_norm_silu_fwd_kernel<T, kCL, kSilu, kVec, false>;
  }
};

template <typename T, bool kCL, bool kSilu, int kVec>
struct Bwd {
  static auto kernel(const GroupNormBwdArgs&) { return &group_norm_silu_bwd_kernel<T, kCL, kSilu, kVec>; }
};

}  // namespace

cudaError_t launch_group_norm_silu_fwd(const GroupNormFwdArgs& args, cudaStream_t stream) {
  return dispatch<Fwd>(args, kFwdArrays, stream);
}

cudaError_t launch_group_norm_silu_bwd(const GroupNormBwdArgs& args, cudaStream_t stream) {
  return dispatch<Bwd>(args, kBwdArrays, stream);
}

size_t group_norm_silu_smem_bytes(const GroupNormShape& s, bool backward) {
  return static_cast<size_t>(backward ? kBwdArrays : kFwdArrays) * (s.groups > 0 ? s.c / s.groups : 0) *
             acc_bytes(s.dtype) +
         kStaticSmemBound;
}

}  // namespace sgdm::cuda
