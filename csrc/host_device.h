// FASTDELTA_HOST_DEVICE marks the functions that the CPU kernels and the CUDA kernels share.
#pragma once

#ifdef __CUDACC__
#define FASTDELTA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTDELTA_HOST_DEVICE inline
#endif
