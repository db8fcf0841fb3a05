//! `blake3`: the BLAKE3 digest of the body, as 64 lowercase hex digits and a newline.
//!
//! GPU path, over a whole batch at once: one thread per 1 KiB chunk of every body in the
//! batch, then the trees reduced one level per launch (each body's own tree, the left-full
//! tree of the BLAKE3 spec). A body cut into pieces (see `batch.rs`) gets each piece's
//! subtree chaining value from the GPU; the CPU merges those into the root.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use ::blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use cudarc::driver::{CudaFunction, PushKernelArg};

use super::{
    bytes, Assembly, Configured, Decoded, Item, Layout, Op, OpOnDevice, Output, Params, Target,
};
use crate::engine::batch::Piece;
use crate::engine::job::JobError;
use crate::gpu::{launch_config, GpuError, Loader, Program};

pub const CONTENT_TYPE: &str = "text/plain";
const CHUNK: u64 = 1024;
/// u64 words per piece descriptor: data offset, length, chunk counter base, first global
/// chunk, whole-body flag (see blake3.cu).
pub const DESC_WORDS: usize = 5;

pub fn parse(args: &[&str]) -> Result<Configured, String> {
    super::no_args("blake3", args)?;
    Configured::plain(Blake3 {
        content_type: Arc::from(CONTENT_TYPE),
    })
}

fn program() -> Arc<Program> {
    static P: OnceLock<Arc<Program>> = OnceLock::new();
    super::builtin_program(&P, "blake3.cu", include_str!("blake3.cu"))
}

pub struct Blake3 {
    content_type: Arc<str>,
}

/// Encodes a 32-byte digest the way both paths answer.
pub fn encode(digest: &[u8; 32]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut body = Vec::with_capacity(65);
    for b in digest {
        body.push(HEX[(b >> 4) as usize]);
        body.push(HEX[(b & 15) as usize]);
    }
    body.push(b'\n');
    body
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

pub fn chunks_of(len: u64) -> u64 {
    len.div_ceil(CHUNK).max(1)
}

impl Op for Blake3 {
    fn name(&self) -> &str {
        "blake3"
    }

    fn programs(&self) -> Vec<Arc<Program>> {
        vec![program()]
    }

    fn splittable(&self) -> bool {
        true
    }

    fn worst_case(&self, n: usize, _bytes: usize) -> (usize, usize) {
        (8 * DESC_WORDS * n, 32 * n)
    }

    fn run_cpu(&self, body: Vec<u8>, _: &Params, _: Option<&Decoded>) -> Result<Output, JobError> {
        Ok(self.finish(::blake3::hash(&body).as_bytes(), None))
    }

    fn finish(&self, result: &[u8], _: Option<&Decoded>) -> Output {
        Output::new(
            self.content_type.clone(),
            encode(result.try_into().expect("32-byte digest")),
        )
    }

    fn cpu_piece(&self, data: &[u8], piece: &Piece, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&cpu_piece(data, piece.offset, piece.whole));
    }

    fn assembly(&self, _body_len: u64, pieces: u32, _piece_len: u64) -> Box<dyn Assembly> {
        Box::new(Pieces {
            content_type: self.content_type.clone(),
            cvs: vec![[0u8; 32]; pieces as usize],
            left: pieces,
        })
    }

    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError> {
        let kernels = match loader {
            Loader::Device(d) => Some((
                d.function(&program(), "blake3_chunks")?,
                d.function(&program(), "blake3_parents")?,
            )),
            Loader::Host => None,
        };
        Ok(Some(Box::new(OnDevice { kernels })))
    }
}

/// A body cut into pieces: each piece's chaining value, merged into the root at the end.
struct Pieces {
    content_type: Arc<str>,
    cvs: Vec<[u8; 32]>,
    left: u32,
}

impl Assembly for Pieces {
    fn add(&mut self, index: u32, result: &[u8]) -> bool {
        self.cvs[index as usize].copy_from_slice(result);
        self.left -= 1;
        self.left == 0
    }

    fn finish(self: Box<Self>) -> Output {
        Output::new(self.content_type, encode(&merge(&self.cvs)))
    }
}

struct OnDevice {
    /// `blake3_chunks` and `blake3_parents`; none on the test device.
    kernels: Option<(CudaFunction, CudaFunction)>,
}

/// A piece's descriptor, as blake3.cu reads it.
struct Desc {
    data_off: u64,
    len: u64,
    counter: u64,
    whole: bool,
}

fn read_desc(desc: &[u8], i: usize) -> Desc {
    let w = |k: usize| {
        let at = 8 * (DESC_WORDS * i + k);
        u64::from_le_bytes(desc[at..at + 8].try_into().expect("8 bytes"))
    };
    Desc {
        data_off: w(0),
        len: w(1),
        counter: w(2),
        whole: w(4) != 0,
    }
}

impl OpOnDevice for OnDevice {
    /// Pieces back to back; one 32-byte result each (digest or chaining value); two scratch
    /// buffers of 8 words per chunk for the tree levels.
    fn layout(&self, items: &[Item]) -> Layout {
        let mut l = bytes::layout(items, None);
        l.desc_len = 8 * DESC_WORDS * items.len();
        l.out_len = 32 * items.len();
        let chunks: u64 = items.iter().map(|it| chunks_of(it.piece.len)).sum();
        l.scratch = vec![32 * chunks as usize; 2];
        l
    }

    fn pack(
        &self,
        items: &[Item],
        layout: &Layout,
        desc: &mut [u8],
        data: &mut [u8],
    ) -> Vec<(usize, JobError)> {
        let mut first = 0u64;
        for (i, (it, p)) in items.iter().zip(&layout.items).enumerate() {
            let words = [
                p.data_off,
                p.len,
                it.piece.offset / CHUNK,
                first,
                u64::from(it.piece.whole),
            ];
            for (w, v) in words.iter().enumerate() {
                let at = 8 * (DESC_WORDS * i + w);
                desc[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            first += chunks_of(p.len);
        }
        bytes::pack(items, layout, data)
    }

    /// The chunk kernel, then the tree levels.
    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError> {
        let n = layout.items.len();
        let l = match target {
            Target::Host { desc, data, out } => {
                for i in 0..n {
                    let d = read_desc(desc, i);
                    let bytes = &data[d.data_off as usize..(d.data_off + d.len) as usize];
                    out[32 * i..32 * i + 32].copy_from_slice(&cpu_piece(
                        bytes,
                        d.counter * CHUNK,
                        d.whole,
                    ));
                }
                return Ok(());
            }
            Target::Device(l) => l,
        };
        let (chunks_fn, parents_fn) = self.kernels.as_ref().expect("loaded on a device");
        let total: u64 = layout.items.iter().map(|p| chunks_of(p.len)).sum();
        let n = n as u32;
        let (mut src, mut dst) = (l.scratch[0], l.scratch[1]);
        let mut launch = l.stream.launch_builder(chunks_fn);
        launch
            .arg(&l.desc)
            .arg(&n)
            .arg(&l.data)
            .arg(&total)
            .arg(&src)
            .arg(&l.out);
        // SAFETY: blake3_chunks(const u64 *desc, u32 n, const u8 *data, u64 total, u32 *cvs,
        // u32 *out): desc holds n descriptors, data every piece at its offset, cvs 8 words per
        // chunk, out 8 words per piece.
        unsafe { launch.launch(launch_config(total)) }?;

        let max_chunks = layout
            .items
            .iter()
            .map(|p| chunks_of(p.len))
            .max()
            .unwrap_or(1);
        let (mut level, mut nodes) = (0u32, max_chunks);
        while nodes > 1 {
            let mut launch = l.stream.launch_builder(parents_fn);
            launch
                .arg(&l.desc)
                .arg(&n)
                .arg(&total)
                .arg(&level)
                .arg(&src)
                .arg(&dst)
                .arg(&l.out);
            // SAFETY: blake3_parents(const u64 *desc, u32 n, u64 total, u32 level, const u32
            // *src, u32 *dst, u32 *out): each piece's level-`level` nodes sit at its first
            // chunk's slot in src; dst is as large (the level above has fewer nodes).
            unsafe { launch.launch(launch_config(total.div_ceil(2))) }?;
            std::mem::swap(&mut src, &mut dst);
            nodes = nodes.div_ceil(2);
            level += 1;
        }
        Ok(())
    }

    fn result<'o>(
        &self,
        _layout: &Layout,
        i: usize,
        out: &'o [u8],
    ) -> Result<Cow<'o, [u8]>, JobError> {
        Ok(Cow::Borrowed(&out[32 * i..32 * i + 32]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_matches_known_vector_for_empty_input() {
        // The published BLAKE3 digest of the empty string.
        let op = parse(&[]).unwrap().op;
        let out = op.run_cpu(Vec::new(), &Params::default(), None).unwrap();
        assert_eq!(
            out.body,
            b"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\n"
        );
        assert_eq!(&*out.content_type, "text/plain");
    }

    #[test]
    fn encode_is_lowercase_hex() {
        let mut d = [0u8; 32];
        d[0] = 0xAB;
        d[31] = 0x0F;
        let out = encode(&d);
        assert_eq!(out.len(), 65);
        assert!(out.starts_with(b"ab00"));
        assert!(out.ends_with(b"0f\n"));
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
