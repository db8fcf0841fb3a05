// blake3: BLAKE3 hashing. Chunks are hashed one per thread (blake3_chunks), then the
// tree is reduced one level per launch (blake3_parents), pairing neighbours and
// carrying an odd last node up: the same left-full tree the BLAKE3 spec builds.

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

// One thread per 1 KiB chunk of `in` (len bytes, 16-byte aligned base). Writes the
// chunk's chaining value to cvs[8 * chunk]. With a single chunk the chunk's last
// block is the root. `counter_base` is the index of in[0]'s chunk in the whole input.
extern "C" __global__ void blake3_chunks(const u8 *in, u64 len, u64 n_chunks,
                                         u64 counter_base, u32 *cvs)
{
    GRID_STRIDE(c, n_chunks) {
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
                const uint4 *p = (const uint4 *)(in + off);
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    uint4 w = p[q];
                    m[4 * q] = w.x; m[4 * q + 1] = w.y; m[4 * q + 2] = w.z; m[4 * q + 3] = w.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; i++) m[i] = 0;
                for (u32 i = 0; i < block_len; i++) {
                    u32 byte = in[off + i];
                    // Little-endian words; the shift keeps m[] indexed by constants
                    // only after unrolling, so go through a switch-free select.
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
                if (n_chunks == 1 && counter_base == 0) flags |= B3_ROOT;
            }
            b3_compress(cv, m, counter_base + c, block_len, flags, cv);
        }
#pragma unroll
        for (int i = 0; i < 8; i++) cvs[8 * c + i] = cv[i];
    }
}

// One tree level: parent j of in[2j], in[2j+1]; an odd last node is carried up as is.
// `root` is set for the last level (n == 2).
extern "C" __global__ void blake3_parents(const u32 *in, u64 n, u32 *out, u32 root)
{
    u64 half = (n + 1) / 2;
    GRID_STRIDE(j, half) {
        if (2 * j + 1 < n) {
            u32 m[16];
#pragma unroll
            for (int i = 0; i < 16; i++) m[i] = in[16 * j + i];
            u32 cv[8];
#pragma unroll
            for (int i = 0; i < 8; i++) cv[i] = B3_IV[i];
            b3_compress(cv, m, 0, B3_BLOCK_LEN, B3_PARENT | (root ? B3_ROOT : 0), cv);
#pragma unroll
            for (int i = 0; i < 8; i++) out[8 * j + i] = cv[i];
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) out[8 * j + i] = in[16 * j + i];
        }
    }
}
