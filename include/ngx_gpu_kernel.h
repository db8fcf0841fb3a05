/*
 * ngx_gpu_kernel.h: the ABI between ngx_http_gpu_module and a CUDA kernel served with
 *
 *     gpu_kernel <name> <file.cu> [entry=<function>] [output=...] [args="..."] ...;
 *     location /x { gpu_process kernel <name> [<value> ...]; }
 *
 * NVRTC finds this header by name inside nginx (no file needed): write
 *     #include "ngx_gpu_kernel.h"
 * To build a kernel outside nginx (nvcc, for tests), put this file's directory on the
 * include path. It needs nothing from the CUDA toolkit's own headers.
 *
 * A kernel is   extern "C" __global__ void name(ngx_gpu_batch b)
 * and is launched once per batch: every request that joined the batch, each with its own
 * body, output region, arguments, output length and status. The module picks the grid
 * (enough blocks for one thread per input byte, and at least one block per request, up
 * to 65535); write loops that stride (NGX_GPU_FOR_EACH_BYTE, NGX_GPU_FOR_EACH_REQUEST), so
 * that any grid is right.
 *
 * For each request r (0 <= r < b.n):
 *   input:   b.in + b.in_off[r], b.in_len[r] bytes (each body starts 64-byte aligned)
 *   output:  b.out + b.out_off[r], room for b.out_cap[r] bytes (64-byte aligned)
 *   length:  b.out_len[r], set by the kernel; it starts as b.out_cap[r], so a kernel that
 *            fills its whole region need not set it. More than b.out_cap[r] is refused:
 *            the request gets 500 and nothing past the capacity is sent.
 *   status:  b.status[r], 0 to answer; a kernel sets it (ngx_gpu_reject) to refuse one
 *            request's input: that request gets 400 with the code, its batch mates their
 *            answers.
 *   args:    b.args[r * b.nargs + k], argument k as declared by args="..." (typed
 *            accessors below).
 */

#ifndef NGX_GPU_KERNEL_H
#define NGX_GPU_KERNEL_H

#define NGX_GPU_ABI_VERSION 1

typedef unsigned char ngx_gpu_u8;
typedef unsigned int ngx_gpu_u32;
typedef unsigned long long ngx_gpu_u64;

/* One argument, 8 bytes, as its declared type (i32, u32, i64, u64, f32, f64). */
typedef union {
    long long i;
    unsigned long long u;
    double f;
} ngx_gpu_value;

typedef struct {
    ngx_gpu_u32 n;     /* requests in the batch */
    ngx_gpu_u32 nargs; /* arguments per request */
    ngx_gpu_u64 total; /* input bytes of all requests: b.in_off[n-1] + b.in_len[n-1] and padding */
    const ngx_gpu_u8 *in;
    const ngx_gpu_u64 *in_off;
    const ngx_gpu_u64 *in_len;
    ngx_gpu_u8 *out;
    const ngx_gpu_u64 *out_off;
    const ngx_gpu_u64 *out_cap;
    ngx_gpu_u64 *out_len;
    int *status;
    const ngx_gpu_value *args;
} ngx_gpu_batch;

/* Request r's body and output region. */
__device__ __forceinline__ const ngx_gpu_u8 *ngx_gpu_in(const ngx_gpu_batch &b, ngx_gpu_u32 r)
{
    return b.in + b.in_off[r];
}

__device__ __forceinline__ ngx_gpu_u8 *ngx_gpu_out(const ngx_gpu_batch &b, ngx_gpu_u32 r)
{
    return b.out + b.out_off[r];
}

/* Refuses request r's input: it gets 400 with `code` in its message. */
__device__ __forceinline__ void ngx_gpu_reject(const ngx_gpu_batch &b, ngx_gpu_u32 r, int code)
{
    b.status[r] = code != 0 ? code : 1;
}

/* Argument k of request r, as declared. */
__device__ __forceinline__ int ngx_gpu_arg_i32(const ngx_gpu_batch &b, ngx_gpu_u32 r, ngx_gpu_u32 k)
{
    return (int) b.args[r * b.nargs + k].i;
}

__device__ __forceinline__ unsigned int ngx_gpu_arg_u32(const ngx_gpu_batch &b, ngx_gpu_u32 r, ngx_gpu_u32 k)
{
    return (unsigned int) b.args[r * b.nargs + k].u;
}

__device__ __forceinline__ long long ngx_gpu_arg_i64(const ngx_gpu_batch &b, ngx_gpu_u32 r, ngx_gpu_u32 k)
{
    return b.args[r * b.nargs + k].i;
}

__device__ __forceinline__ unsigned long long ngx_gpu_arg_u64(const ngx_gpu_batch &b, ngx_gpu_u32 r, ngx_gpu_u32 k)
{
    return b.args[r * b.nargs + k].u;
}

__device__ __forceinline__ float ngx_gpu_arg_f32(const ngx_gpu_batch &b, ngx_gpu_u32 r, ngx_gpu_u32 k)
{
    return (float) b.args[r * b.nargs + k].f;
}

__device__ __forceinline__ double ngx_gpu_arg_f64(const ngx_gpu_batch &b, ngx_gpu_u32 r, ngx_gpu_u32 k)
{
    return b.args[r * b.nargs + k].f;
}

/* Which request global input byte i belongs to (binary search over the bodies), and its
 * offset in that body; false for the padding between bodies. */
__device__ __forceinline__ bool ngx_gpu_locate(const ngx_gpu_batch &b, ngx_gpu_u64 i,
                                               ngx_gpu_u32 *r, ngx_gpu_u64 *j)
{
    ngx_gpu_u32 lo = 0, hi = b.n;
    while (hi - lo > 1) {
        ngx_gpu_u32 mid = (lo + hi) / 2;
        if (b.in_off[mid] <= i) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if (b.n == 0 || i < b.in_off[lo] || i - b.in_off[lo] >= b.in_len[lo]) {
        return false;
    }
    *r = lo;
    *j = i - b.in_off[lo];
    return true;
}

/* Every input byte of every request, over the whole grid: r is the request, j the byte's
 * offset in its body.
 *     NGX_GPU_FOR_EACH_BYTE(b, r, j) { ngx_gpu_out(b, r)[j] = ngx_gpu_in(b, r)[j] ^ 0x5a; }
 */
#define NGX_GPU_FOR_EACH_BYTE(b, r, j)                                                  \
    for (ngx_gpu_u64 ngx_gpu_i_ = (ngx_gpu_u64) blockIdx.x * blockDim.x + threadIdx.x; \
         ngx_gpu_i_ < (b).total; ngx_gpu_i_ += (ngx_gpu_u64) gridDim.x * blockDim.x)  \
        if (ngx_gpu_u32 r = 0; false) {                                                \
        } else if (ngx_gpu_u64 j = 0; !ngx_gpu_locate((b), ngx_gpu_i_, &r, &j)) {      \
        } else

/* One block per request (blocks take requests in turn): the block's threads work on
 * request r together, e.g. a reduction in shared memory.
 *     NGX_GPU_FOR_EACH_REQUEST(b, r) { ... threadIdx.x ... __syncthreads() ... }
 */
#define NGX_GPU_FOR_EACH_REQUEST(b, r) \
    for (ngx_gpu_u32 r = blockIdx.x; r < (b).n; r += gridDim.x)

/* Half and bfloat16 values kept as their 16 bits, converted with PTX instructions (no
 * cuda_fp16.h needed). bfloat16 from float needs sm_80 or later. */
typedef unsigned short ngx_gpu_half;
typedef unsigned short ngx_gpu_bf16;

__device__ __forceinline__ float ngx_gpu_half_to_float(ngx_gpu_half h)
{
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ ngx_gpu_half ngx_gpu_float_to_half(float f)
{
    ngx_gpu_half h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float ngx_gpu_bf16_to_float(ngx_gpu_bf16 h)
{
    return __uint_as_float(((unsigned int) h) << 16);
}

__device__ __forceinline__ ngx_gpu_bf16 ngx_gpu_float_to_bf16(float f)
{
    ngx_gpu_bf16 h;
    asm("{ .reg .b16 t; cvt.rn.bf16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}

#endif /* NGX_GPU_KERNEL_H */
