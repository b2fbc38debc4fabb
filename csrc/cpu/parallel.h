// How finely the CPU kernels split work across threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sgdm::cpu {

// A call with fewer elements than this runs on the calling thread. Waking the
// OpenMP team for it saves a few microseconds at best (2 cores here), while on
// a loaded machine every parallel region can stall for a scheduler slice
// (measured 8-24 ms) waiting for a descheduled team thread: the small UNet's
// 4x128x4x4 GroupNorm forward took 16 us inline and 8 ms median with 2
// threads under load 4.7.
constexpr int64_t kMinParallelElements = 16384;

// at::parallel_for grain, in tasks of `elems_per_task` elements, that keeps
// calls below kMinParallelElements in all on one thread.
inline int64_t grain_for(int64_t elems_per_task) {
  const int64_t per = std::max<int64_t>(elems_per_task, 1);
  return std::max<int64_t>(1, (kMinParallelElements + per - 1) / per);
}

}  // namespace sgdm::cpu
