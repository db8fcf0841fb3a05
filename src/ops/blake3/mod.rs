//! `blake3`: the BLAKE3 digest of the body, as 64 lowercase hex digits and a newline.
//!
//! GPU path, over a whole batch at once: one thread per 1 KiB chunk of every body in the
//! batch, then the trees reduced one level per launch (each body's own tree, the left-full
//! tree of the BLAKE3 spec). A body cut into pieces (see `batch.rs`) gets each piece's
//! subtree chaining value from the GPU; the CPU merges those into the root.

use ::blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use cudarc::driver::PushKernelArg;

use super::{Output, Staged};
use crate::gpu::{launch_config, Functions, GpuError, Launch};

pub const CONTENT_TYPE: &str = "text/plain";
const CHUNK: u64 = 1024;
/// u64 words per piece descriptor: data offset, length, chunk counter base, first global
/// chunk, whole-body flag (see blake3.cu).
pub const DESC_WORDS: usize = 5;

/// Encodes a 32-byte digest the way both paths answer.
pub fn encode(digest: &[u8; 32]) -> Output {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut body = Vec::with_capacity(65);
    for b in digest {
        body.push(HEX[(b >> 4) as usize]);
        body.push(HEX[(b & 15) as usize]);
    }
    body.push(b'\n');
    Output {
        content_type: CONTENT_TYPE,
        body,
    }
}

pub fn cpu(input: &[u8]) -> Output {
    encode(::blake3::hash(input).as_bytes())
}

/// The CPU path for one piece: the digest of a whole body, or the chaining value of the
/// subtree a piece at `offset` is (non-root).
pub fn cpu_piece(data: &[u8], offset: u64, whole: bool) -> [u8; 32] {
    if whole {
        return *::blake3::hash(data).as_bytes();
    }
    let mut h = ::blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// The root digest from the chaining values of a body's pieces, in order (two or more):
/// neighbours paired level by level, an odd last one carried up, as the spec's tree does
/// for pieces of equal power-of-two size.
pub fn merge(cvs: &[ChainingValue]) -> [u8; 32] {
    assert!(cvs.len() >= 2, "a body of one piece has its digest already");
    let mut level = cvs.to_vec();
    while level.len() > 2 {
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    merge_subtrees_non_root(&p[0], &p[1], Mode::Hash)
                } else {
                    p[0]
                }
            })
            .collect();
    }
    *merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes()
}

/// A piece's 32 result bytes in the batch's output (digest or chaining value).
pub fn result(out: &[u8], index_in_batch: usize) -> &[u8] {
    &out[32 * index_in_batch..32 * index_in_batch + 32]
}

pub fn chunks_of(len: u64) -> u64 {
    len.div_ceil(CHUNK).max(1)
}

/// Writes the descriptors of `pieces` into `desc` (DESC_WORDS u64 each); returns the
/// total number of chunks.
pub fn describe(pieces: &[Staged], desc: &mut [u8]) -> u64 {
    let mut first = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        let words = [
            p.data_off,
            p.len,
            p.offset / CHUNK,
            first,
            u64::from(p.whole),
        ];
        for (w, v) in words.iter().enumerate() {
            let at = 8 * (DESC_WORDS * i + w);
            desc[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        first += chunks_of(p.len);
    }
    first
}

/// Queues the chunk kernel and the tree levels for a described batch.
pub fn gpu_launch(
    k: &Functions,
    l: &Launch,
    pieces: &[Staged],
    total_chunks: u64,
) -> Result<(), GpuError> {
    let n = pieces.len() as u32;
    let mut launch = l.stream.launch_builder(&k.blake3_chunks);
    launch
        .arg(&l.desc)
        .arg(&n)
        .arg(&l.data)
        .arg(&total_chunks)
        .arg(&l.cv_a)
        .arg(&l.out);
    // SAFETY: blake3_chunks(const u64 *desc, u32 n, const u8 *data, u64 total, u32 *cvs,
    // u32 *out): desc holds n descriptors, data every piece at its offset, cvs 8 words per
    // chunk, out 8 words per piece.
    unsafe { launch.launch(launch_config(total_chunks)) }?;

    let max_chunks = pieces.iter().map(|p| chunks_of(p.len)).max().unwrap_or(1);
    let (mut level, mut nodes) = (0u32, max_chunks);
    let (mut src, mut dst) = (l.cv_a, l.cv_b);
    while nodes > 1 {
        let mut launch = l.stream.launch_builder(&k.blake3_parents);
        launch
            .arg(&l.desc)
            .arg(&n)
            .arg(&total_chunks)
            .arg(&level)
            .arg(&src)
            .arg(&dst)
            .arg(&l.out);
        // SAFETY: blake3_parents(const u64 *desc, u32 n, u64 total, u32 level, const u32
        // *src, u32 *dst, u32 *out): each piece's level-`level` nodes sit at its first
        // chunk's slot in src; dst is as large (the level above has fewer nodes).
        unsafe { launch.launch(launch_config(total_chunks.div_ceil(2))) }?;
        std::mem::swap(&mut src, &mut dst);
        nodes = nodes.div_ceil(2);
        level += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_matches_known_vector_for_empty_input() {
        // The published BLAKE3 digest of the empty string.
        let out = cpu(b"");
        assert_eq!(
            out.body,
            b"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\n"
        );
        assert_eq!(out.content_type, "text/plain");
    }

    #[test]
    fn encode_is_lowercase_hex() {
        let mut d = [0u8; 32];
        d[0] = 0xAB;
        d[31] = 0x0F;
        let out = encode(&d);
        assert_eq!(out.body.len(), 65);
        assert!(out.body.starts_with(b"ab00"));
        assert!(out.body.ends_with(b"0f\n"));
    }

    #[test]
    fn pieces_merged_give_the_digest_of_the_whole_body() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let data: Vec<u8> = (0..(9 * 4096 + 77))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for piece in [1024usize, 4096, 8192] {
            for len in [
                piece + 1,
                2 * piece,
                3 * piece - 1,
                5 * piece + 3,
                data.len(),
            ] {
                let body = &data[..len.min(data.len())];
                let cvs: Vec<_> = body
                    .chunks(piece)
                    .enumerate()
                    .map(|(i, p)| cpu_piece(p, (i * piece) as u64, false))
                    .collect();
                assert_eq!(
                    merge(&cvs),
                    *::blake3::hash(body).as_bytes(),
                    "piece {piece}, len {}",
                    body.len()
                );
            }
        }
    }
}
