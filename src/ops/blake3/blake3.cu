// blake3: BLAKE3 hashing over a batch of pieces. Chunks are hashed one per thread
// (blake3_chunks), then every piece's tree is reduced one level per launch
// (blake3_parents), pairing neighbours and carrying an odd last node up: the same
// left-full tree the BLAKE3 spec builds.

#include "ngx_gpu_common.cuh"

#define B3_CHUNK_LEN 1024
#define B3_BLOCK_LEN 64
#define B3_CHUNK_START 1u
#define B3_CHUNK_END 2u
#define B3_PARENT 4u
#define B3_ROOT 8u

__device__ __constant__ u32 B3_IV[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

__device__ __forceinline__ u32 b3_rotr(u32 x, u32 n)
{
    return __funnelshift_r(x, x, n);
}

#define B3_G(a, b, c, d, x, y)            \
    do {                                  \
        a = a + b + (x);                  \
        d = b3_rotr(d ^ a, 16);           \
        c = c + d;                        \
        b = b3_rotr(b ^ c, 12);           \
        a = a + b + (y);                  \
        d = b3_rotr(d ^ a, 8);            \
        c = c + d;                        \
        b = b3_rotr(b ^ c, 7);            \
    } while (0)

// One BLAKE3 compression; writes the 8-word chaining value (the first half of the
// output, which is also the root hash when ROOT is set).
__device__ __forceinline__ void b3_compress(const u32 cv[8], u32 m[16], u64 counter,
                                            u32 block_len, u32 flags, u32 out[8])
{
    u32 v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3];
    u32 v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
    u32 v8 = B3_IV[0], v9 = B3_IV[1], v10 = B3_IV[2], v11 = B3_IV[3];
    u32 v12 = (u32)counter, v13 = (u32)(counter >> 32), v14 = block_len, v15 = flags;

#pragma unroll
    for (int r = 0; r < 7; r++) {
        B3_G(v0, v4, v8, v12, m[0], m[1]);
        B3_G(v1, v5, v9, v13, m[2], m[3]);
        B3_G(v2, v6, v10, v14, m[4], m[5]);
        B3_G(v3, v7, v11, v15, m[6], m[7]);
        B3_G(v0, v5, v10, v15, m[8], m[9]);
        B3_G(v1, v6, v11, v12, m[10], m[11]);
        B3_G(v2, v7, v8, v13, m[12], m[13]);
        B3_G(v3, v4, v9, v14, m[14], m[15]);

        if (r < 6) {
            // The message permutation, written out so every index is a constant
            // and m[] stays in registers.
            u32 t0 = m[2], t1 = m[6], t2 = m[3], t3 = m[10];
            u32 t4 = m[7], t5 = m[0], t6 = m[4], t7 = m[13];
            u32 t8 = m[1], t9 = m[11], t10 = m[12], t11 = m[5];
            u32 t12 = m[9], t13 = m[14], t14 = m[15], t15 = m[8];
            m[0] = t0; m[1] = t1; m[2] = t2; m[3] = t3;
            m[4] = t4; m[5] = t5; m[6] = t6; m[7] = t7;
            m[8] = t8; m[9] = t9; m[10] = t10; m[11] = t11;
            m[12] = t12; m[13] = t13; m[14] = t14; m[15] = t15;
        }
    }

    out[0] = v0 ^ v8;  out[1] = v1 ^ v9;  out[2] = v2 ^ v10; out[3] = v3 ^ v11;
    out[4] = v4 ^ v12; out[5] = v5 ^ v13; out[6] = v6 ^ v14; out[7] = v7 ^ v15;
}

// A batch is a list of pieces, each described by 5 u64 words (see src/ops/blake3.rs):
//   [0] offset of the piece's bytes in `data`   [1] its length
//   [2] chunk counter of its first chunk (its offset in the body / 1024)
//   [3] index of its first chunk among all the batch's chunks   [4] 1 if it is a whole body
// Every piece has at least one chunk (an empty body is one empty chunk). Piece i's result
// (the digest of a whole body, else the chaining value of the piece's subtree) goes to
// out[8 * i].

#define B3_DESC 5

__device__ __forceinline__ u64 b3_chunks_of(u64 len)
{
    return len == 0 ? 1 : (len + B3_CHUNK_LEN - 1) / B3_CHUNK_LEN;
}

// The piece that global chunk g belongs to: the last one whose first chunk is <= g.
__device__ __forceinline__ u32 b3_piece_of(const u64 *desc, u32 n, u64 g)
{
    u32 lo = 0, hi = n - 1;
    while (lo < hi) {
        u32 mid = (lo + hi + 1) / 2;
        if (desc[B3_DESC * mid + 3] <= g) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One thread per 1 KiB chunk of the batch: writes the chunk's chaining value to
// cvs[8 * g]. A piece of one chunk is finished here (root flag if it is a whole body).
extern "C" __global__ void blake3_chunks(const u64 *desc, u32 n, const u8 *data,
                                         u64 total_chunks, u32 *cvs, u32 *out)
{
    GRID_STRIDE(g, total_chunks) {
        u32 p = b3_piece_of(desc, n, g);
        const u64 *d = desc + B3_DESC * p;
        const u8 *in = data + d[0];
        u64 len = d[1], base = d[2], first = d[3];
        bool whole = d[4] != 0;
        u64 n_chunks = b3_chunks_of(len);
        u64 c = g - first;

        u64 start = c * B3_CHUNK_LEN;
        u64 chunk_len = len - start < B3_CHUNK_LEN ? len - start : B3_CHUNK_LEN;
        u32 n_blocks = chunk_len == 0 ? 1 : (u32)((chunk_len + B3_BLOCK_LEN - 1) / B3_BLOCK_LEN);
        u32 cv[8];
#pragma unroll
        for (int i = 0; i < 8; i++) cv[i] = B3_IV[i];

        for (u32 b = 0; b < n_blocks; b++) {
            u64 off = start + (u64)b * B3_BLOCK_LEN;
            u32 block_len = chunk_len - (u64)b * B3_BLOCK_LEN < B3_BLOCK_LEN
                                ? (u32)(chunk_len - (u64)b * B3_BLOCK_LEN)
                                : B3_BLOCK_LEN;
            u32 m[16];
            if (block_len == B3_BLOCK_LEN) {
                const uint4 *q4 = (const uint4 *)(in + off);
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    uint4 w = q4[q];
                    m[4 * q] = w.x; m[4 * q + 1] = w.y; m[4 * q + 2] = w.z; m[4 * q + 3] = w.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; i++) m[i] = 0;
                for (u32 i = 0; i < block_len; i++) {
                    u32 byte = in[off + i];
                    // Little-endian words; compare against constants so that m[] stays
                    // in registers after unrolling.
#pragma unroll
                    for (int w = 0; w < 16; w++) {
                        if ((i >> 2) == (u32)w) m[w] |= byte << (8 * (i & 3));
                    }
                }
            }
            u32 flags = 0;
            if (b == 0) flags |= B3_CHUNK_START;
            if (b == n_blocks - 1) {
                flags |= B3_CHUNK_END;
                if (n_chunks == 1 && whole) flags |= B3_ROOT;
            }
            b3_compress(cv, m, base + c, block_len, flags, cv);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) cvs[8 * g + i] = cv[i];
        if (n_chunks == 1) {
#pragma unroll
            for (int i = 0; i < 8; i++) out[8 * p + i] = cv[i];
        }
    }
}

// One tree level for every piece of the batch. A piece's nodes at every level sit from
// its first chunk's slot on: at level k it has ceil(n_chunks / 2^k) nodes in src, and
// parent j of nodes 2j, 2j+1 goes to dst (an odd last node is carried up as is). The
// piece whose level has two nodes is finished: its result goes to out (root flag for a
// whole body; a piece's subtree value stays non-root).
extern "C" __global__ void blake3_parents(const u64 *desc, u32 n, u64 total_chunks, u32 level,
                                          const u32 *src, u32 *dst, u32 *out)
{
    GRID_STRIDE(g, total_chunks) {
        u32 p = b3_piece_of(desc, n, g);
        const u64 *d = desc + B3_DESC * p;
        u64 first = d[3];
        u64 nodes = (b3_chunks_of(d[1]) + ((1ull << level) - 1)) >> level;
        u64 j = g - first;
        if (nodes <= 1 || j >= (nodes + 1) / 2) continue;
        const u32 *a = src + 8 * (first + 2 * j);
        u32 *o = dst + 8 * (first + j);
        if (2 * j + 1 < nodes) {
            u32 m[16];
#pragma unroll
            for (int i = 0; i < 16; i++) m[i] = a[i];
            u32 cv[8];
#pragma unroll
            for (int i = 0; i < 8; i++) cv[i] = B3_IV[i];
            u32 flags = B3_PARENT | (nodes == 2 && d[4] != 0 ? B3_ROOT : 0);
            b3_compress(cv, m, 0, B3_BLOCK_LEN, flags, cv);
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = cv[i];
            if (nodes == 2) {
#pragma unroll
                for (int i = 0; i < 8; i++) out[8 * p + i] = cv[i];
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = a[i];
        }
    }
}
