// rgba_blur: a 3x3 box blur of raw RGBA pixels (8 bits a channel, rows top to bottom).
//
//   gpu_kernel rgba_blur kernels/rgba_blur.cu "args=width:u32,height:u32" type=image/x-rgba;
//   location = /blur { gpu_process kernel rgba_blur $arg_width $arg_height; }
//
//   curl --data-binary @image.rgba 'http://127.0.0.1:8080/blur?width=640&height=480'
//
// Each channel of each pixel becomes the mean of that channel over the pixel and its
// neighbours inside the image (4 at a corner, 6 on an edge, 9 inside), rounded half up.
// A body that is not width x height x 4 bytes is refused: 400, code 1.

#include "ngx_gpu_kernel.h"

extern "C" __global__ void rgba_blur(ngx_gpu_batch b)
{
    NGX_GPU_FOR_EACH_BYTE(b, r, j) {
        const ngx_gpu_u64 w = ngx_gpu_arg_u32(b, r, 0);
        const ngx_gpu_u64 h = ngx_gpu_arg_u32(b, r, 1);
        if (w == 0 || h == 0 || w * h * 4 != b.in_len[r]) {
            if (j == 0) {
                ngx_gpu_reject(b, r, 1);
            }
            continue;
        }
        const ngx_gpu_u8 *in = ngx_gpu_in(b, r);
        const ngx_gpu_u64 pixel = j / 4, channel = j % 4;
        const long long x = (long long) (pixel % w), y = (long long) (pixel / w);
        unsigned int sum = 0, count = 0;
        for (long long dy = -1; dy <= 1; dy++) {
            for (long long dx = -1; dx <= 1; dx++) {
                const long long nx = x + dx, ny = y + dy;
                if (nx < 0 || ny < 0 || nx >= (long long) w || ny >= (long long) h) {
                    continue;
                }
                sum += in[((ngx_gpu_u64) ny * w + (ngx_gpu_u64) nx) * 4 + channel];
                count++;
            }
        }
        ngx_gpu_out(b, r)[j] = (ngx_gpu_u8) ((sum + count / 2) / count);
    }
}
