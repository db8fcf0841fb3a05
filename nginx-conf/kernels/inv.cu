#include "ngx_gpu_kernel.h"
extern "C" __global__ void inv(ngx_gpu_batch b) {}
