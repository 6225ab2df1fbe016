// Shared by the CPU (g++) and CUDA (nvcc) halves: per-element math is written once.
#pragma once

#if defined(__CUDACC__)
#define DLK_HD __host__ __device__ __forceinline__
#else
#define DLK_HD inline
#endif
