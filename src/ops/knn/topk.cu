// knn search kernels: query preparation and the block-wide top-k selection (see gpu.rs for
// the design). Served with the common header (ngx_gpu_common.cuh); no other include.
#include "ngx_gpu_common.cuh"

// One selection block handles KNN_SEG values, KNN_PER per thread held in registers.
#define KNN_THREADS 256
#define KNN_SEG 4096
#define KNN_PER (KNN_SEG / KNN_THREADS)
#define KNN_MAX_K 2048
#define KNN_BINS 2048
#define KNN_WARPS (KNN_THREADS / 32)
#define KNN_L2 2
// At most this many values are ranked by counting rather than radix-selected.
#define KNN_RANKED 512

// A score as a u32 whose unsigned order is "better first": the float's bits made
// order-preserving (positive: sign bit set; negative: all bits flipped), inverted for L2,
// where smaller is better.
__device__ __forceinline__ u32 knn_key(float s, int l2) {
    u32 b = __float_as_uint(s);
    u32 k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return l2 ? ~k : k;
}

__device__ __forceinline__ float knn_unkey(u32 k, int l2) {
    if (l2) k = ~k;
    u32 b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(b);
}

// A candidate: key in the high word, the row's complement in the low word, so that one
// unsigned comparison orders by score (better first) and then by lower row. Every
// candidate of a real row is unique; 0 is the "no row" filler, worse than any real one.
__device__ __forceinline__ u64 knn_pack(float s, u32 row, int l2) {
    return ((u64)knn_key(s, l2) << 32) | (u64)(~row);
}

struct KnnShared {
    // Radix histogram, or (as u64) the values to rank.
    u32 hist[KNN_BINS];
    u32 wsum[KNN_WARPS];
    u64 sel[KNN_MAX_K];
    u32 bucket;
    u32 need;
    u32 count;
    u32 eq;
    u32 found;
    u32 live;
    u64 least;
};

// Leaves in sh.sel[0..kk) the kk largest of the block's values (v[j] of thread t is value
// j * KNN_THREADS + t, valid below len), in no particular order. kk <= len, kk <= MAX_K.
// Fillers (0) do not count: where kk or fewer others remain, those are taken. Otherwise,
// for kk <= KNN_THREADS, a prefilter first: the kk-th largest of the threads' own maxima
// is a bound no value below which can be among the kk best (kk values, those maxima, are
// at least as good), and below it values become fillers; on scores of any spread that
// leaves about kk. Where up to KNN_RANKED remain, each is ranked by counting the better
// ones. Otherwise a radix select, most significant digit first (11, 11, 10 bits of the
// key, then of the row only where keys tie), counting only the values that still match
// the chosen prefix; it stops as soon as the bucket holds exactly the values still needed.
// Every value that is not a filler is unique (a row's candidate), which the prefilter and
// the ranking rely on. v may be changed (values turned into fillers).
__device__ u32 knn_live(const u64 (&v)[KNN_PER], u32 len, KnnShared &sh) {
    const u32 t = threadIdx.x;
    if (t == 0) sh.live = 0;
    __syncthreads();
    u32 mine = 0;
#pragma unroll
    for (int j = 0; j < KNN_PER; ++j) mine += (j * KNN_THREADS + t < len && v[j] != 0);
    if (mine) atomicAdd(&sh.live, mine);
    __syncthreads();
    const u32 live = sh.live;
    __syncthreads();
    return live;
}

__device__ void knn_select(u64 (&v)[KNN_PER], u32 len, u32 kk, KnnShared &sh) {
    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5;
    if (t == 0) sh.count = 0;
    u32 live = knn_live(v, len, sh);
    if (live > kk && kk <= KNN_THREADS) {
        u64 m = 0;
#pragma unroll
        for (int j = 0; j < KNN_PER; ++j)
            if (j * KNN_THREADS + t < len && v[j] > m) m = v[j];
        u64 *maxima = (u64 *)sh.hist;
        maxima[t] = m;
        if (t == 0) sh.least = 0;
        __syncthreads();
        // The maxima that are not fillers are unique: exactly one has rank kk - 1, unless
        // fewer than kk threads hold any value (then the bound stays 0: no filtering).
        u32 rank = 0;
        for (u32 j = 0; j < KNN_THREADS; ++j) rank += maxima[j] > m;
        if (m != 0 && rank == kk - 1) sh.least = m;
        __syncthreads();
        const u64 bound = sh.least;
#pragma unroll
        for (int j = 0; j < KNN_PER; ++j)
            if (v[j] < bound) v[j] = 0;
        if (bound != 0) live = knn_live(v, len, sh);
    }
    // Where they are no more than kk (a short segment, a tile whose values the running
    // threshold turned into fillers, or what the prefilter left), take them all.
    if (live <= kk) {
#pragma unroll
        for (int j = 0; j < KNN_PER; ++j) {
            u32 i = j * KNN_THREADS + t;
            if (i < len && v[j] != 0) sh.sel[atomicAdd(&sh.count, 1u)] = v[j];
        }
        for (u32 i = live + t; i < kk; i += KNN_THREADS) sh.sel[i] = 0;
        __syncthreads();
        return;
    }
    // Few: rank each by counting the better ones (the histogram's memory holds them).
    if (live <= KNN_RANKED) {
        u64 *few = (u64 *)sh.hist;
#pragma unroll
        for (int j = 0; j < KNN_PER; ++j) {
            u32 i = j * KNN_THREADS + t;
            if (i < len && v[j] != 0) few[atomicAdd(&sh.count, 1u)] = v[j];
        }
        __syncthreads();
        for (u32 i = t; i < live; i += KNN_THREADS) {
            const u64 x = few[i];
            u32 rank = 0;
            for (u32 j = 0; j < live; ++j) rank += few[j] > x || (few[j] == x && j < i);
            if (rank < kk) sh.sel[rank] = x;
        }
        __syncthreads();
        return;
    }
    const int shifts[6] = {53, 42, 32, 21, 10, 0};
    u64 prefix = 0;
    int shift = 64;
    u32 need = kk;
    for (int p = 0; p < 6; ++p) {
        const int ns = shifts[p];
        const u32 mask = (1u << (shift - ns)) - 1;
        for (u32 i = t; i < KNN_BINS; i += KNN_THREADS) sh.hist[i] = 0;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < KNN_PER; ++j) {
            u32 i = j * KNN_THREADS + t;
            bool in = i < len && (shift == 64 || (v[j] >> shift) == prefix);
            u32 bin = in ? (u32)(v[j] >> ns) & mask : 0xffffffffu;
            if (p == 0) {
                // Scores of one segment crowd into few top bins: one atomic per bin per warp.
                u32 peers = __match_any_sync(0xffffffffu, bin);
                if (in && (u32)(__ffs(peers) - 1) == lane) atomicAdd(&sh.hist[bin], __popc(peers));
            } else if (in) {
                atomicAdd(&sh.hist[bin], 1u);
            }
        }
        __syncthreads();
        // Thread t owns bins [8t, 8t+8); "above" counts the values in higher bins.
        const u32 per = KNN_BINS / KNN_THREADS;
        u32 local[KNN_BINS / KNN_THREADS];
        u32 sum = 0;
#pragma unroll
        for (u32 b = 0; b < per; ++b) {
            local[b] = sh.hist[t * per + b];
            sum += local[b];
        }
        u32 incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            u32 o = __shfl_down_sync(0xffffffffu, incl, off);
            if (lane + off < 32) incl += o;
        }
        if (lane == 0) sh.wsum[warp] = incl;
        __syncthreads();
        u32 above = incl - sum;
        for (u32 w = warp + 1; w < KNN_WARPS; ++w) above += sh.wsum[w];
#pragma unroll
        for (int b = per - 1; b >= 0; --b) {
            u32 c = local[b];
            if (above < need && need <= above + c) {
                sh.bucket = t * per + b;
                sh.need = need - above;
                sh.found = c;
            }
            above += c;
        }
        __syncthreads();
        prefix = (shift == 64 ? 0 : (prefix << (shift - ns))) | sh.bucket;
        need = sh.need;
        shift = ns;
        const bool done = sh.found == need;
        __syncthreads();
        if (done) break;
    }
    if (t == 0) {
        sh.count = 0;
        sh.eq = 0;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < KNN_PER; ++j) {
        u32 i = j * KNN_THREADS + t;
        if (i >= len) continue;
        u64 hi = v[j] >> shift;
        // Values equal to the threshold are identical (only fillers can be): any of them.
        if (hi > prefix || (hi == prefix && atomicAdd(&sh.eq, 1u) < need)) {
            sh.sel[atomicAdd(&sh.count, 1u)] = v[j];
        }
    }
    __syncthreads();
}

// Sorts sh.sel[0..kk) largest first (bitonic, padded with fillers to a power of two).
__device__ void knn_sort(KnnShared &sh, u32 kk) {
    const u32 t = threadIdx.x;
    u32 p2 = 1;
    while (p2 < kk) p2 <<= 1;
    for (u32 i = kk + t; i < p2; i += KNN_THREADS) sh.sel[i] = 0;
    __syncthreads();
    for (u32 size = 2; size <= p2; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = t; i < p2 / 2; i += KNN_THREADS) {
                u32 lo = 2 * i - (i & (stride - 1));
                u32 hi = lo + stride;
                bool desc = (lo & size) == 0;
                u64 a = sh.sel[lo], b = sh.sel[hi];
                if (desc ? a < b : a > b) {
                    sh.sel[lo] = b;
                    sh.sel[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}

// Prepares n vectors of d floats, one block per vector (grid-stride): writes their squared
// norms to norm2 (if not null), and to out (if not null) the vector, scaled to unit length
// if normalize (a zero vector stays zero), as float or, if half, float16 (round to nearest).
extern "C" __global__ void knn_prep(const float *x, u32 n, u32 d, int normalize, int half,
                                    void *out, float *norm2) {
    __shared__ float red[32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (u64 v = blockIdx.x; v < n; v += gridDim.x) {
        const float *p = x + v * d;
        float ss = 0.f;
        for (u32 i = threadIdx.x; i < d; i += blockDim.x) ss = fmaf(p[i], p[i], ss);
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
        if (lane == 0) red[warp] = ss;
        __syncthreads();
        if (warp == 0) {
            ss = lane < warps ? red[lane] : 0.f;
            for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
            if (lane == 0) red[0] = ss;
        }
        __syncthreads();
        ss = red[0];
        __syncthreads();
        if (norm2 && threadIdx.x == 0) norm2[v] = ss;
        if (!out) continue;
        const float scale = normalize ? (ss > 0.f ? 1.f / sqrtf(ss) : 0.f) : 1.f;
        for (u32 i = threadIdx.x; i < d; i += blockDim.x) {
            float val = p[i] * scale;
            if (half) {
                unsigned short h;
                asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(val));
                ((unsigned short *)out)[v * d + i] = h;
            } else {
                ((float *)out)[v * d + i] = val;
            }
        }
    }
}

// First selection of a tile: block (s, q) takes segment s (KNN_SEG columns) of query q's
// row of the tile's product (t columns, row-major, rows row0..), turns each product into
// the metric's score (L2: |q|^2 + |x|^2 - 2 q.x, at least 0) and writes its best k
// candidates (fillers where the segment is shorter) at out[q * out_stride + off + s * k].
// Candidates no better than thresh[q] (the running k-th best: they cannot enter the
// result) count as fillers, which makes later tiles cheap.
extern "C" __global__ void __launch_bounds__(KNN_THREADS)
knn_select_tile(const float *prod, u32 t, u32 row0, const float *xnorm, const float *qnorm,
                int metric, u32 k, const u64 *thresh, u64 *out, u64 out_stride, u32 off) {
    __shared__ KnnShared sh;
    const u32 q = blockIdx.y, s = blockIdx.x;
    const u32 first = s * KNN_SEG;
    const u32 len = min((u32)KNN_SEG, t - first);
    const float *src = prod + (u64)q * t + first;
    const int l2 = metric == KNN_L2;
    const float qn = l2 ? qnorm[q] : 0.f;
    const u64 bar = thresh[q];
    u64 v[KNN_PER];
#pragma unroll
    for (int j = 0; j < KNN_PER; ++j) {
        u32 i = j * KNN_THREADS + threadIdx.x;
        v[j] = 0;
        if (i < len) {
            float x = src[i];
            u32 row = row0 + first + i;
            if (l2) x = fmaxf(fmaf(-2.f, x, qn + xnorm[row]), 0.f);
            u64 c = knn_pack(x, row, l2);
            v[j] = c > bar ? c : 0;
        }
    }
    const u32 kk = min(k, len);
    knn_select(v, len, kk, sh);
    u64 *dst = out + (u64)q * out_stride + off + (u64)s * k;
    for (u32 i = threadIdx.x; i < k; i += KNN_THREADS) dst[i] = i < kk ? sh.sel[i] : 0;
}

// Merges candidate lists: block (s, q) takes candidates [s * KNN_SEG, ...) of query q's m
// (at in[q * in_stride]) and writes its best k at out[q * out_stride + s * k]; in place
// (out == in) only with one block per query, which then also writes the k-th best to
// thresh[q] if thresh is not null. With rows (one block per query): writes the best k
// sorted instead, as row numbers (-1 for fillers: k beyond the index) and scores at
// rows[q * k] and scores[q * k].
extern "C" __global__ void __launch_bounds__(KNN_THREADS)
knn_select_list(const u64 *in, u64 in_stride, u32 m, u32 k, u64 *out, u64 out_stride,
                int metric, long long *rows, float *scores, u64 *thresh) {
    __shared__ KnnShared sh;
    const u32 q = blockIdx.y, s = blockIdx.x;
    const u32 first = s * KNN_SEG;
    const u32 len = min((u32)KNN_SEG, m - first);
    const u64 *src = in + (u64)q * in_stride + first;
    u64 v[KNN_PER];
#pragma unroll
    for (int j = 0; j < KNN_PER; ++j) {
        u32 i = j * KNN_THREADS + threadIdx.x;
        v[j] = i < len ? src[i] : 0;
    }
    const u32 kk = min(k, len);
    knn_select(v, len, kk, sh);
    if (rows) {
        const int l2 = metric == KNN_L2;
        knn_sort(sh, kk);
        for (u32 i = threadIdx.x; i < k; i += KNN_THREADS) {
            u64 c = i < kk ? sh.sel[i] : 0;
            u32 row = ~(u32)c;
            bool filler = row == 0xffffffffu;
            rows[(u64)q * k + i] = filler ? -1ll : (long long)row;
            scores[(u64)q * k + i] =
                filler ? (l2 ? __int_as_float(0x7f800000) : __int_as_float(0xff800000))
                       : knn_unkey((u32)(c >> 32), l2);
        }
        return;
    }
    u64 *dst = out + (u64)q * out_stride + (u64)s * k;
    u64 least = ~0ull;
    for (u32 i = threadIdx.x; i < k; i += KNN_THREADS) {
        u64 c = i < kk ? sh.sel[i] : 0;
        dst[i] = c;
        least = c < least ? c : least;
    }
    if (!thresh) return;
    if (threadIdx.x == 0) sh.least = ~0ull;
    __syncthreads();
    atomicMin(&sh.least, least);
    __syncthreads();
    if (threadIdx.x == 0) thresh[q] = sh.least;
}
