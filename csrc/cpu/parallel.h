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

// at::parallel_for grain, in tasks of `work_per_task` units, that keeps calls
// of at most `min_parallel_work` units in all on one thread (at::parallel_for
// runs inline unless the task count exceeds the grain). By default the unit
// is an element and the limit kMinParallelElements.
inline int64_t grain_for(int64_t work_per_task, int64_t min_parallel_work = kMinParallelElements) {
  const int64_t per = std::max<int64_t>(work_per_task, 1);
  return std::max<int64_t>(1, (min_parallel_work + per - 1) / per);
}

}  // namespace sgdm::cpu
