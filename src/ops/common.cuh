// Shared definitions for every kernel of ngx_http_gpu_module.
//
// NVRTC has no include path here: the module concatenates this header and each
// .cu file of src/kernels/ into one program (see src/gpu/kernels.rs), so .cu
// files use what is declared here without an #include.

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (u64)gridDim.x * blockDim.x)
