// knn search for float16 indexes: the tile's matrix product fused with the first selection
// (see gpu.rs). Tensor-core mma.sync (sm_80 and later: this program is compiled for
// compute_80 and loaded only where the device has it). Served with the common header.
#include "ngx_gpu_common.cuh"

typedef unsigned short u16;

// A block covers one selection segment of rows (the unit knn_select_tile writes k
// candidates for), in steps of RS rows, for QB queries.
#define KF_SEG 4096
// The largest k this path takes: a query's candidates kept in shared memory are k plus one
// step's rows, so that a step always has room.
#define KF_MAX_K 64
// Halves of a row per shared-memory chunk, and the chunk's row pitch (padded by 16 bytes:
// the 8 rows one ldmatrix reads fall on distinct banks).
#define KF_KC 64
#define KF_PITCH (KF_KC + 8)

// The block's shape: WR x WQ warps, each 32 rows x 16 queries; NS shared-memory stages
// (2: a chunk is stored to one while warps may still multiply the other, one barrier a
// chunk; 1: two barriers a chunk, for a shape whose two stages would not let two blocks
// share an SM).
template <int WR, int WQ, int NS> struct KfShape {
    static constexpr int NT = 32 * WR * WQ;
    static constexpr int RS = 32 * WR;
    static constexpr int QB = 16 * WQ;
    static constexpr int BQ = KF_MAX_K + RS;
    // One stage of a chunk: RS rows then QB queries, KF_PITCH halves each.
    static constexpr int STAGE = (RS + QB) * KF_PITCH;
    // Shared memory, in this order: candidates (u64 [QB][BQ]), thresholds (u64 [QB]),
    // counts (u32 [QB]), query norms and score limits (float [QB] each), the stages
    // (u16). gpu.rs's FUSED_SHAPES states the same sizes.
    static constexpr u32 BYTES = QB * BQ * 8 + QB * 20 + NS * STAGE * 2;
};

// Same as topk.cu's: the score as an order-preserving u32 ("better first"), above the row's
// complement.
__device__ __forceinline__ u64 kf_pack(float s, u32 row, int l2) {
    u32 b = __float_as_uint(s);
    u32 k = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    if (l2) k = ~k;
    return ((u64)k << 32) | (u64)(~row);
}

// Eight halves of a row from element k0: zeros past d or for a missing row; one 16-byte
// load where rows are 16-byte aligned (d a multiple of 8).
__device__ __forceinline__ uint4 kf_fetch(const u16 *row, bool ok, u32 k0, u32 d, bool vec) {
    uint4 r = make_uint4(0, 0, 0, 0);
    if (!ok || k0 >= d) return r;
    if (vec) return __ldg((const uint4 *)(row + k0));
    u16 h[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) h[e] = k0 + e < d ? row[k0 + e] : (u16)0;
    r.x = h[0] | ((u32)h[1] << 16);
    r.y = h[2] | ((u32)h[3] << 16);
    r.z = h[4] | ((u32)h[5] << 16);
    r.w = h[6] | ((u32)h[7] << 16);
    return r;
}

__device__ __forceinline__ void kf_ldsm4(u32 (&r)[4], const u16 *p) {
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void kf_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One warp keeps the k best of a query's n > k candidates (unique, none 0) at b[0..k):
// finds the k-th best exactly, bit by bit from the top (the largest t with k values at
// least t), then packs those at least it to the front. Returns it: the query's threshold
// in this block from now on.
template <int BQ>
__device__ u64 kf_compact(u64 *b, u32 n, u32 k) {
    const u32 lane = threadIdx.x & 31;
    u64 v[BQ / 32];
#pragma unroll
    for (int j = 0; j < BQ / 32; ++j) {
        u32 i = j * 32 + lane;
        v[j] = i < n ? b[i] : 0;
    }
    u64 t = 0;
    for (int bit = 63; bit >= 0; --bit) {
        const u64 try_t = t | (1ull << bit);
        u32 c = 0;
#pragma unroll
        for (int j = 0; j < BQ / 32; ++j) c += v[j] >= try_t;
        if (__reduce_add_sync(0xffffffffu, c) >= k) t = try_t;
    }
    __syncwarp();
    u32 at = 0;
#pragma unroll
    for (int j = 0; j < BQ / 32; ++j) {
        const bool keep = v[j] >= t;
        const u32 mask = __ballot_sync(0xffffffffu, keep);
        if (keep) b[at + __popc(mask & ((1u << lane) - 1))] = v[j];
        at += __popc(mask);
    }
    __syncwarp();
    return t;
}

__device__ __forceinline__ float kf_unkey(u32 k, int l2) {
    if (l2) k = ~k;
    u32 b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(b);
}

// The score a query's candidate must reach (at least, or at most for L2) to be better than
// its threshold (a candidate, 0 for none yet, ~0 for no query): what lets the products be
// filtered by one float comparison each, the exact comparison left to the few that pass.
__device__ __forceinline__ float kf_limit(u64 thr, int l2) {
    const float inf = __int_as_float(0x7f800000);
    if (thr == 0) return l2 ? inf : -inf;
    if (thr == ~0ull) return l2 ? -inf : inf;
    return kf_unkey((u32)(thr >> 32), l2);
}

// Block (x, y) takes queries [x * QB, ...) of the m and the segment y of the tile's rows
// [row0, end): rows row0 + y * KF_SEG on, at most KF_SEG. It computes their products with
// the queries (float16 inputs, float32 sums) RS rows at a time, turns them into scores (as
// knn_select_tile does) and keeps those better than the query's running threshold
// thresh[q] and than its k-th best in this block so far; at the end it writes the block's
// best k (fillers past what it found) at out[q * out_stride + off + y * k], as
// knn_select_tile does for a segment. x: float16 rows, d each; q: m float16 queries.
// Scores that are NaN are never kept.
template <int WR, int WQ, int NS>
__device__ void kf_search(const u16 *x, u32 end, u32 row0, u32 d, const u16 *q, u32 m,
                          const float *xnorm, const float *qnorm, int metric, u32 k,
                          const u64 *thresh, u64 *out, u64 out_stride, u32 off) {
    typedef KfShape<WR, WQ, NS> S;
    constexpr int NT = S::NT, RS = S::RS, QB = S::QB, BQ = S::BQ, NW = NT / 32;
    extern __shared__ __align__(16) unsigned char kf_smem[];
    u32 have;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
    if (have < S::BYTES || k == 0 || k > KF_MAX_K) __trap();
    u64 *buf = (u64 *)kf_smem;
    u64 *thr = buf + QB * BQ;
    u32 *cnt = (u32 *)(thr + QB);
    float *qn = (float *)(cnt + QB);
    float *lim = qn + QB;
    u16 *stages = (u16 *)(lim + QB);

    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const u32 wr = warp % WR, wq = warp / WR;
    const u32 g = lane >> 2, c4 = lane & 3;
    const u32 q0 = blockIdx.x * QB;
    const u32 first = row0 + blockIdx.y * KF_SEG;
    const u32 last = min(first + KF_SEG, end);
    const int l2 = metric == 2;
    const bool vec = (d & 7) == 0;
    for (u32 i = t; i < QB; i += NT) {
        const bool ok = q0 + i < m;
        thr[i] = ok ? thresh[q0 + i] : ~0ull;
        lim[i] = kf_limit(thr[i], l2);
        cnt[i] = 0;
        qn[i] = ok && l2 ? qnorm[q0 + i] : 0.f;
    }
    const u32 steps = (last - first + RS - 1) / RS;
    const u32 chunks = (d + KF_KC - 1) / KF_KC;
    const u32 total = steps * chunks;
    // What each thread fetches per chunk: RS rows x 8 groups of 8 halves, then QB queries.
    constexpr int RV = RS * 8 / NT;
    constexpr int QV = (QB * 8 + NT - 1) / NT;
    uint4 rr[RV], qq[QV];
    auto fetch = [&](u32 it) {
        const u32 step = it / chunks, kc = (it % chunks) * KF_KC;
        const u32 r0 = first + step * RS;
#pragma unroll
        for (int j = 0; j < RV; ++j) {
            const u32 slot = j * NT + t, r = slot >> 3, grp = slot & 7;
            const u32 row = r0 + r;
            rr[j] = kf_fetch(x + (u64)row * d, row < last, kc + grp * 8, d, vec);
        }
#pragma unroll
        for (int j = 0; j < QV; ++j) {
            const u32 slot = j * NT + t, r = slot >> 3, grp = slot & 7;
            if (slot < QB * 8)
                qq[j] = kf_fetch(q + (u64)(q0 + r) * d, q0 + r < m, kc + grp * 8, d, vec);
        }
    };
    float acc[2][2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    if (total > 0) fetch(0);
    for (u32 it = 0; it < total; ++it) {
        u16 *srows = stages + (it % NS) * S::STAGE;
        u16 *sq = srows + RS * KF_PITCH;
#pragma unroll
        for (int j = 0; j < RV; ++j) {
            const u32 slot = j * NT + t;
            *(uint4 *)(srows + (slot >> 3) * KF_PITCH + (slot & 7) * 8) = rr[j];
        }
#pragma unroll
        for (int j = 0; j < QV; ++j) {
            const u32 slot = j * NT + t;
            if (slot < QB * 8) *(uint4 *)(sq + (slot >> 3) * KF_PITCH + (slot & 7) * 8) = qq[j];
        }
        __syncthreads();
        if (it + 1 < total) fetch(it + 1);
        const u32 kc = (it % chunks) * KF_KC;
        const u32 ksteps = min((u32)KF_KC, d - kc + 15) / 16;
        for (u32 ks = 0; ks < ksteps; ++ks) {
            const u32 k0 = ks * 16;
            u32 a[2][4], b[4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                kf_ldsm4(a[i], srows + (wr * 32 + i * 16 + (lane & 15)) * KF_PITCH + k0 +
                                   (lane >> 4) * 8);
            kf_ldsm4(b, sq + (wq * 16 + (lane & 7) + ((lane >> 4) << 3)) * KF_PITCH + k0 +
                            ((lane >> 3) & 1) * 8);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                kf_mma(acc[i][0], a[i], b[0], b[1]);
                kf_mma(acc[i][1], a[i], b[2], b[3]);
            }
        }
        if (NS == 1) __syncthreads();
        if (it % chunks != chunks - 1) continue;
        // The step's products: scores; those that reach the query's limit (few, once the
        // thresholds are set) are compared exactly and kept.
        const u32 r0 = first + (it / chunks) * RS;
        float lq[2][2], nq[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                lq[j][e] = lim[wq * 16 + j * 8 + 2 * c4 + e];
                nq[j][e] = qn[wq * 16 + j * 8 + 2 * c4 + e];
            }
        bool kept = false;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 row = r0 + wr * 32 + i * 16 + g + h * 8;
                const bool real = row < last;
                const float xn = l2 && real ? xnorm[row] : 0.f;
#pragma unroll
                for (int j = 0; j < 2; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float s = acc[i][j][h * 2 + e];
                        acc[i][j][h * 2 + e] = 0.f;
                        if (l2) s = fmaxf(fmaf(-2.f, s, nq[j][e] + xn), 0.f);
                        if (!(l2 ? s <= lq[j][e] : s >= lq[j][e]) || !real) continue;
                        const u32 ql = wq * 16 + j * 8 + 2 * c4 + e;
                        const u64 cand = kf_pack(s, row, l2);
                        if (cand > thr[ql]) {
                            buf[ql * BQ + atomicAdd(&cnt[ql], 1u)] = cand;
                            kept = true;
                        }
                    }
                }
            }
        }
        // Room for the next step: a query past BQ - RS keeps its best k. (The next chunk's
        // barrier orders this before the next step's reads of thr and lim.)
        if (__syncthreads_or(kept)) {
            for (u32 ql = warp; ql < QB; ql += NW) {
                const u32 n = cnt[ql];
                if (n > BQ - RS) {
                    const u64 kth = kf_compact<BQ>(buf + ql * BQ, n, k);
                    if (lane == 0) {
                        cnt[ql] = k;
                        thr[ql] = kth;
                        lim[ql] = kf_limit(kth, l2);
                    }
                }
            }
        }
    }
    // The warp that compacted a query's candidates above writes them: no barrier needed.
    for (u32 ql = warp; ql < QB; ql += NW) {
        if (q0 + ql >= m) continue;
        u32 n = cnt[ql];
        if (n > k) {
            kf_compact<BQ>(buf + ql * BQ, n, k);
            n = k;
        }
        u64 *dst = out + (u64)(q0 + ql) * out_stride + off + (u64)blockIdx.y * k;
        for (u32 i = lane; i < k; i += 32) dst[i] = i < n ? buf[ql * BQ + i] : 0;
    }
}

#define KF_ENTRY(name, wr, wq, ns, min_blocks)                                                \
    extern "C" __global__ void __launch_bounds__(32 * wr * wq, min_blocks)                    \
        name(const u16 *x, u32 end, u32 row0, u32 d, const u16 *q, u32 m, const float *xnorm, \
             const float *qnorm, int metric, u32 k, const u64 *thresh, u64 *out,              \
             u64 out_stride, u32 off) {                                                        \
        kf_search<wr, wq, ns>(x, end, row0, d, q, m, xnorm, qnorm, metric, k, thresh, out,     \
                              out_stride, off);                                                \
    }

// The shapes, 8 warps and two blocks an SM each (as measured on the H100, two blocks an SM
// beat one block with deeper copies): 16 queries x 256 rows a step, one stage; 32 x 128
// and 64 x 64, two stages.
KF_ENTRY(knn_fused_q16, 8, 1, 1, 2)
KF_ENTRY(knn_fused_q32, 4, 2, 2, 2)
KF_ENTRY(knn_fused_q64, 2, 4, 2, 2)
