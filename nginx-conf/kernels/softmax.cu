// softmax: the softmax of a vector of float32 (little-endian), per request, with a
// temperature: y[i] = exp((x[i] - max x) / t) / sum over k of exp((x[k] - max x) / t).
//
//   gpu_kernel softmax kernels/softmax.cu args=t:f32 block=256 type=application/octet-stream;
//   location = /softmax { gpu_process kernel softmax $arg_t; }
//
// One block per request: the block finds the maximum, then the sum, in shared memory, then
// writes the outputs (block= must be a power of two, at most 256). A body that is not a whole number of float32 values, or a
// temperature that is not positive, is refused: 400, code 1 or 2.

#include "ngx_gpu_kernel.h"

#define SOFTMAX_BLOCK 256

// Reduces v over the block (max or sum); every thread gets the result.
__device__ float block_reduce(float v, bool is_max, float *shared)
{
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) {
            float o = shared[threadIdx.x + s];
            shared[threadIdx.x] = is_max ? fmaxf(shared[threadIdx.x], o) : shared[threadIdx.x] + o;
        }
        __syncthreads();
    }
    float result = shared[0];
    __syncthreads();
    return result;
}

extern "C" __global__ void softmax(ngx_gpu_batch b)
{
    __shared__ float shared[SOFTMAX_BLOCK];
    NGX_GPU_FOR_EACH_REQUEST(b, r) {
        const float t = ngx_gpu_arg_f32(b, r, 0);
        if (b.in_len[r] % 4 != 0 || !(t > 0.0f)) {
            if (threadIdx.x == 0) {
                ngx_gpu_reject(b, r, b.in_len[r] % 4 != 0 ? 1 : 2);
            }
            continue;
        }
        const float *x = (const float *) ngx_gpu_in(b, r);
        float *y = (float *) ngx_gpu_out(b, r);
        const ngx_gpu_u64 n = b.in_len[r] / 4;
        float m = __int_as_float(0xff800000); // -infinity (no math.h under NVRTC)
        for (ngx_gpu_u64 i = threadIdx.x; i < n; i += blockDim.x) {
            m = fmaxf(m, x[i]);
        }
        m = block_reduce(m, true, shared);
        float s = 0.0f;
        for (ngx_gpu_u64 i = threadIdx.x; i < n; i += blockDim.x) {
            s += expf((x[i] - m) / t);
        }
        s = block_reduce(s, false, shared);
        for (ngx_gpu_u64 i = threadIdx.x; i < n; i += blockDim.x) {
            y[i] = expf((x[i] - m) / t) / s;
        }
    }
}
