// echo: copies the body through device memory unchanged (diagnostics, overhead).

#include "ngx_gpu_common.cuh"

// Copies n16 16-byte words, then the tail bytes; both buffers are 256-byte aligned
// allocations, so the vector accesses are aligned.
extern "C" __global__ void echo_copy(const u8 *in, u8 *out, u64 len)
{
    const uint4 *in16 = (const uint4 *)in;
    uint4 *out16 = (uint4 *)out;
    u64 n16 = len / 16;

    GRID_STRIDE(i, n16) {
        out16[i] = in16[i];
    }

    u64 tail = len - n16 * 16;
    GRID_STRIDE(j, tail) {
        out[n16 * 16 + j] = in[n16 * 16 + j];
    }
}
