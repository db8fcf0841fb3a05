// hex: each byte of the body as two lowercase hexadecimal digits (what `xxd -p` prints,
// without its line breaks).
//
//   gpu_kernel hex kernels/hex.cu output=x2 type=text/plain;
//   location = /hex { gpu_process kernel hex; }

#include "ngx_gpu_kernel.h"

extern "C" __global__ void hex(ngx_gpu_batch b)
{
    const char digits[] = "0123456789abcdef";
    NGX_GPU_FOR_EACH_BYTE(b, r, j) {
        const ngx_gpu_u8 v = ngx_gpu_in(b, r)[j];
        ngx_gpu_u8 *out = ngx_gpu_out(b, r);
        out[2 * j] = digits[v >> 4];
        out[2 * j + 1] = digits[v & 15];
    }
}
