// SSMTUNE_HD marks a small function that the CPU reference and a CUDA kernel both call, so the two
// backends share one definition of it rather than two copies that must agree.
#pragma once

#if defined(__CUDACC__)
#define SSMTUNE_HD __host__ __device__ __forceinline__
#else
#define SSMTUNE_HD inline
#endif
