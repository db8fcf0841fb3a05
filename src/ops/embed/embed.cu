// The embed op's kernels: everything of a BERT-family encoder but its matrix products
// (cuBLAS does those). A batch is packed without padding: its texts' tokens one after
// another (T in all), text s at tokens start[s] .. start[s] + len[s]. Attention runs per
// (text, head) over the text's own keys only, which is what a padding mask computes.
//
// Each kernel comes in three storage precisions for what feeds the matrix products (f32,
// f16, bf16: the _f32/_f16/_bf16 suffix); sums, softmax, layer norms, residuals and the
// pooled output are float32 throughout.
#include "ngx_gpu_common.cuh"

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float store(float f) { return f; }
};

struct F16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(unsigned short h)
    {
        float f;
        asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ unsigned short store(float f)
    {
        unsigned short h;
        asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
        return h;
    }
};

struct BF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(unsigned short h)
    {
        return __uint_as_float(((u32) h) << 16);
    }
    // Round to nearest even in integer arithmetic (no sm_80 conversion needed).
    static __device__ __forceinline__ unsigned short store(float f)
    {
        u32 u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            return 0x7fc0;
        }
        u += 0x7fffu + ((u >> 16) & 1u);
        return (unsigned short) (u >> 16);
    }
};

// Each row kernel's dynamic shared memory: one row of h floats.
extern __shared__ float dyn_row[];

#define NEG_INF __int_as_float(0xff800000)

// The sum of v over the block (every thread gets it); red: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float *red)
{
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    __syncthreads();  // red may still be read by the previous call
    if ((threadIdx.x & 31) == 0) {
        red[threadIdx.x >> 5] = v;
    }
    __syncthreads();
    float s = 0.0f;
    for (int w = 0; w < (int) ((blockDim.x + 31) >> 5); w++) {
        s += red[w];
    }
    return s;
}

// Layer norm of one row (in shared memory, each element written by the thread that reads
// it here) into x (float32) and xh (the products' input precision).
template <class P>
__device__ void norm_row(const float *row, int h, const float *g, const float *b, float eps,
                         float *x, typename P::T *xh, float *red)
{
    float s = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        s += row[i];
    }
    const float mean = block_sum(s, red) / h;
    float v = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float d = row[i] - mean;
        v += d * d;
    }
    const float inv = rsqrtf(block_sum(v, red) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        const float y = (row[i] - mean) * inv * g[i] + b[i];
        x[i] = y;
        xh[i] = P::store(y);
    }
}

// One block per token: word + position + token type embeddings, then the layer norm.
// Indices past their tables are clamped (the host never sends such, but a kernel must not
// read outside them). Dynamic shared memory: h floats.
template <class P>
__device__ void embed_ln(const u32 *ids, const u32 *types, const u32 *pos,
                         const typename P::T *word, const typename P::T *posemb,
                         const typename P::T *typemb, const float *g, const float *b,
                         float *x, typename P::T *xh, int h, float eps, u32 vocab,
                         u32 ntypes, u32 npos)
{
    float *row = dyn_row;
    __shared__ float red[32];
    const u64 t = blockIdx.x;
    const u64 id = min(ids[t], vocab - 1), ty = min(types[t], ntypes - 1),
              p = min(pos[t], npos - 1);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        row[i] = P::load(word[id * h + i]) + P::load(posemb[p * h + i]) +
                 P::load(typemb[ty * h + i]);
    }
    norm_row<P>(row, h, g, b, eps, x + t * h, xh + t * h, red);
}

// One block per token: x = LayerNorm(y + bias + x), the residual and norm after attention
// and after the feed-forward network.
template <class P>
__device__ void add_ln(const float *y, const float *bias, float *x, typename P::T *xh,
                       const float *g, const float *b, int h, float eps)
{
    float *row = dyn_row;
    __shared__ float red[32];
    const u64 t = blockIdx.x;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        row[i] = y[t * h + i] + bias[i] + x[t * h + i];
    }
    norm_row<P>(row, h, g, b, eps, x + t * h, xh + t * h, red);
}

__device__ __forceinline__ float activate(float x, int act)
{
    switch (act) {
    case 0:
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case 1: {
        const float c = 0.79788456080286536f;  // sqrt(2 / pi)
        return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    default:
        return fmaxf(x, 0.0f);
    }
}

// out = act(y + bias) over n rows of w, into the next product's input precision.
template <class P>
__device__ void bias_act(const float *y, const float *bias, typename P::T *out, u64 n, int w,
                         int act)
{
    GRID_STRIDE(i, n * (u64) w) {
        out[i] = P::store(activate(y[i] + bias[i % w], act));
    }
}

// Attention for one (text, head, block of queries: the grid's x, y, z): a thread per
// query, its query and output in registers, keys and values in tiles of KT through shared
// memory, softmax online (the sum and output rescaled when the running maximum grows). qkv: [T, 3h]
// float32 from the product, without its bias (added here); ctx: [T, h]. DH: the head
// width rounded up to 32 or 64 (the register arrays' size; wider heads would spill them,
// and the common encoders' heads are 32 or 64 wide).
#define KT 32
template <class P, int DH>
__device__ void attention(const float *qkv, const float *bias, typename P::T *ctx,
                          const u32 *start, const u32 *len, int h, int dh, float scale)
{
    __shared__ float ks[KT][DH + 1];
    __shared__ float vs[KT][DH];
    const int L = len[blockIdx.x], head = blockIdx.y;
    if ((int) (blockIdx.z * blockDim.x) >= L) {
        return;  // the whole block: no __syncthreads is left waiting
    }
    const u64 base = start[blockIdx.x], h3 = 3 * (u64) h;
    const int qi = blockIdx.z * blockDim.x + threadIdx.x, off = head * dh;
    const bool active = qi < L;
    float q[DH], acc[DH];
#pragma unroll
    for (int d = 0; d < DH; d++) {
        q[d] = active && d < dh ? (qkv[(base + qi) * h3 + off + d] + bias[off + d]) * scale
                                : 0.0f;
        acc[d] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int k0 = 0; k0 < L; k0 += KT) {
        const int nk = min(KT, L - k0);
        __syncthreads();
        for (int e = threadIdx.x; e < nk * DH; e += blockDim.x) {
            const int j = e / DH, d = e % DH;
            const u64 r = (base + k0 + j) * h3;
            ks[j][d] = d < dh ? qkv[r + h + off + d] + bias[h + off + d] : 0.0f;
            vs[j][d] = d < dh ? qkv[r + 2 * h + off + d] + bias[2 * h + off + d] : 0.0f;
        }
        __syncthreads();
        if (!active) {
            continue;
        }
#pragma unroll 1
        for (int j = 0; j < nk; j++) {
            float s = 0.0f;
#pragma unroll
            for (int d = 0; d < DH; d++) {
                s += q[d] * ks[j][d];  // both are 0 past dh
            }
            if (s > m) {
                const float corr = expf(m - s);
                l *= corr;
#pragma unroll
                for (int d = 0; d < DH; d++) {
                    acc[d] *= corr;
                }
                m = s;
            }
            const float p = expf(s - m);
            l += p;
#pragma unroll
            for (int d = 0; d < DH; d++) {
                acc[d] += p * vs[j][d];
            }
        }
    }
    if (active) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int d = 0; d < DH; d++) {  // constant indices keep acc in registers
            if (d < dh) {
                ctx[(base + qi) * h + off + d] = P::store(acc[d] * inv);
            }
        }
    }
}

// One block per text: the mean of its tokens (or its first token), scaled to length 1
// where asked (a zero vector stays zero). out: [n, h] float32, in the batch's order.
// Dynamic shared memory: h floats.
extern "C" __global__ void embed_pool(const float *x, const u32 *start, const u32 *len,
                                      float *out, int h, int cls, int normalize)
{
    float *row = dyn_row;
    __shared__ float red[32];
    const u64 base = start[blockIdx.x];
    const int L = len[blockIdx.x];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = 0.0f;
        if (L > 0 && cls) {
            v = x[base * h + i];
        } else if (L > 0) {
            for (int t = 0; t < L; t++) {
                v += x[(base + t) * h + i];
            }
            v /= L;
        }
        row[i] = v;
        ss += v * v;
    }
    const float norm = block_sum(ss, red);
    const float scale = normalize ? 1.0f / fmaxf(sqrtf(norm), 1e-12f) : 1.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        out[(u64) blockIdx.x * h + i] = row[i] * scale;
    }
}

#define EMBED_KERNELS(P, S)                                                                  \
    extern "C" __global__ void embed_ln_##S(                                                \
        const u32 *ids, const u32 *types, const u32 *pos, const P::T *word,                 \
        const P::T *posemb, const P::T *typemb, const float *g, const float *b, float *x,   \
        P::T *xh, int h, float eps, u32 vocab, u32 ntypes, u32 npos)                        \
    {                                                                                        \
        embed_ln<P>(ids, types, pos, word, posemb, typemb, g, b, x, xh, h, eps, vocab,      \
                    ntypes, npos);                                                           \
    }                                                                                        \
    extern "C" __global__ void embed_add_ln_##S(const float *y, const float *bias, float *x, \
                                                P::T *xh, const float *g, const float *b,   \
                                                int h, float eps)                            \
    {                                                                                        \
        add_ln<P>(y, bias, x, xh, g, b, h, eps);                                             \
    }                                                                                        \
    extern "C" __global__ void embed_bias_act_##S(const float *y, const float *bias,        \
                                                  P::T *out, u64 n, int w, int act)         \
    {                                                                                        \
        bias_act<P>(y, bias, out, n, w, act);                                                \
    }                                                                                        \
    EMBED_ATTENTION(P, S, 32)                                                                \
    EMBED_ATTENTION(P, S, 64)

#define EMBED_ATTENTION(P, S, DH)                                                            \
    extern "C" __global__ void embed_attention_##S##_##DH(                                  \
        const float *qkv, const float *bias, P::T *ctx, const u32 *start, const u32 *len,   \
        int h, int dh, float scale)                                                          \
    {                                                                                        \
        attention<P, DH>(qkv, bias, ctx, start, len, h, dh, scale);                          \
    }

EMBED_KERNELS(F32, f32)
EMBED_KERNELS(F16, f16)
EMBED_KERNELS(BF16, bf16)
