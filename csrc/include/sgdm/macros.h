// Portability macros shared by the CPU (C++) and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SGDM_HOST_DEVICE __host__ __device__
#define SGDM_DEVICE __device__
#else
#define SGDM_HOST_DEVICE
#define SGDM_DEVICE
#endif

#define SGDM_INLINE SGDM_HOST_DEVICE inline
