// Shared definitions for the built-in ops' kernels. NVRTC has no include path here:
// the module serves this file from memory as "ngx_gpu_common.cuh" (src/ops/mod.rs).
#pragma once

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (u64)gridDim.x * blockDim.x)
