//! Ops: the kinds of payload work `gpu_process` can run, with their CPU and GPU paths.
//!
//! Each op lives in its own file: the CPU implementation (test reference, fallback and
//! benchmark baseline), the batched GPU launch and the encoder. This file dispatches on
//! the op and puts a body's result back together from its pieces.

pub mod blake3;
pub mod echo;

use crate::engine::batch::Piece;
use crate::gpu::{host_copy, Functions, GpuError, Launch};

/// One configured op, as parsed from `gpu_process <op> [args];`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Echo,
    Blake3,
}

/// The result of running an op on one request body.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// A piece of a batch as staged for the GPU: where its bytes are in the packed data.
#[derive(Clone, Copy, Debug)]
pub struct Staged {
    pub data_off: u64,
    pub len: u64,
    /// Where the piece starts in its body.
    pub offset: u64,
    pub whole: bool,
}

pub const OP_NAMES: &str = "echo, blake3";

impl Op {
    /// Every op, for limits that must hold for any of them.
    pub const ALL: [Op; 2] = [Op::Echo, Op::Blake3];

    /// Parses the arguments of `gpu_process` (the op name first).
    pub fn parse(args: &[&str]) -> Result<Op, String> {
        let (name, rest) = match args.split_first() {
            Some(x) => x,
            None => return Err("needs an op".into()),
        };
        let op = match *name {
            "echo" => Op::Echo,
            "blake3" => Op::Blake3,
            _ => return Err(format!("unknown op \"{name}\" (known ops: {OP_NAMES})")),
        };
        if let Some(extra) = rest.first() {
            return Err(format!("op \"{name}\" takes no arguments, got \"{extra}\""));
        }
        Ok(op)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Echo => "echo",
            Op::Blake3 => "blake3",
        }
    }

    /// Runs the op on the CPU over a whole body it may keep (echo answers with it).
    pub fn run_cpu(self, input: Vec<u8>) -> Output {
        match self {
            Op::Echo => echo::cpu(input),
            Op::Blake3 => blake3::cpu(&input),
        }
    }

    /// The CPU path for one piece: what the GPU path would leave for it in its output.
    /// `scratch` receives the result; the piece's data is `data`.
    pub fn cpu_piece(self, data: &[u8], piece: &Piece, scratch: &mut Vec<u8>) {
        scratch.clear();
        match self {
            Op::Echo => scratch.extend_from_slice(data),
            Op::Blake3 => {
                scratch.extend_from_slice(&blake3::cpu_piece(data, piece.offset, piece.whole))
            }
        }
    }

    /// What the batched GPU path leaves in its output buffer for `pieces` (packed in `data`
    /// as staged), computed on the CPU: the test device runs this, so the GPU thread's
    /// handling of outputs is tested without a GPU, and the GPU tests compare against it.
    pub fn cpu_batch(self, pieces: &[Staged], data: &[u8], out: &mut [u8]) {
        match self {
            Op::Echo => out[..data.len()].copy_from_slice(data),
            Op::Blake3 => {
                for (i, p) in pieces.iter().enumerate() {
                    let bytes = &data[p.data_off as usize..(p.data_off + p.len) as usize];
                    out[32 * i..32 * i + 32]
                        .copy_from_slice(&blake3::cpu_piece(bytes, p.offset, p.whole));
                }
            }
        }
    }

    /// Bytes of descriptors a batch of `n` pieces needs in front of its data.
    pub fn desc_len(self, n: usize) -> usize {
        match self {
            Op::Echo => 0,
            Op::Blake3 => 8 * blake3::DESC_WORDS * n,
        }
    }

    /// Bytes of result a batch of `n` pieces and `data_len` staged bytes leaves in its
    /// output buffer.
    pub fn out_len(self, n: usize, data_len: u64) -> usize {
        match self {
            Op::Echo => data_len as usize,
            Op::Blake3 => 32 * n,
        }
    }

    /// Work-buffer words a batch needs (per chunk chaining values).
    pub fn cv_words(self, pieces: &[Staged]) -> usize {
        match self {
            Op::Echo => 0,
            Op::Blake3 => {
                8 * pieces
                    .iter()
                    .map(|p| blake3::chunks_of(p.len) as usize)
                    .sum::<usize>()
            }
        }
    }

    /// Writes the batch's descriptors and queues its kernels.
    pub fn gpu_launch(
        self,
        k: &Functions,
        l: &Launch,
        pieces: &[Staged],
        data_len: u64,
    ) -> Result<(), GpuError> {
        match self {
            Op::Echo => echo::gpu_launch(k, l, data_len),
            Op::Blake3 => {
                let total = pieces.iter().map(|p| blake3::chunks_of(p.len)).sum();
                blake3::gpu_launch(k, l, pieces, total)
            }
        }
    }

    /// Fills the descriptor region of a staged batch (before the upload).
    pub fn describe(self, pieces: &[Staged], desc: &mut [u8]) {
        if let Op::Blake3 = self {
            blake3::describe(pieces, desc);
        }
    }

    /// Piece `i`'s result bytes in the batch's output.
    pub fn result<'a>(self, out: &'a [u8], i: usize, piece: &Staged) -> &'a [u8] {
        match self {
            Op::Echo => echo::result(out, piece),
            Op::Blake3 => blake3::result(out, i),
        }
    }

    /// The answer for a body that was one whole piece, from that piece's result.
    pub fn finish_whole(self, result: &[u8]) -> Output {
        match self {
            Op::Echo => Output {
                content_type: echo::CONTENT_TYPE,
                body: host_copy(result),
            },
            Op::Blake3 => blake3::encode(result.try_into().expect("32-byte digest")),
        }
    }
}

/// A body cut into pieces, put back together as its pieces' results arrive (in any order).
pub struct Assembly {
    op: Op,
    left: u32,
    piece_len: u64,
    echo: Vec<u8>,
    cvs: Vec<[u8; 32]>,
}

impl Assembly {
    pub fn new(op: Op, len: u64, pieces: u32, piece_len: u64) -> Assembly {
        let (echo, cvs) = match op {
            Op::Echo => (vec![0u8; len as usize], Vec::new()),
            Op::Blake3 => (Vec::new(), vec![[0u8; 32]; pieces as usize]),
        };
        Assembly {
            op,
            left: pieces,
            piece_len,
            echo,
            cvs,
        }
    }

    /// Takes one piece's result; true when every piece has arrived.
    pub fn add(&mut self, index: u32, result: &[u8]) -> bool {
        match self.op {
            Op::Echo => {
                let at = (index as u64 * self.piece_len) as usize;
                self.echo[at..at + result.len()].copy_from_slice(result);
            }
            Op::Blake3 => self.cvs[index as usize].copy_from_slice(result),
        }
        self.left -= 1;
        self.left == 0
    }

    pub fn finish(self) -> Output {
        match self.op {
            Op::Echo => Output {
                content_type: echo::CONTENT_TYPE,
                body: self.echo,
            },
            Op::Blake3 => blake3::encode(&blake3::merge(&self.cvs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_ops() {
        assert_eq!(Op::parse(&["echo"]), Ok(Op::Echo));
        assert_eq!(Op::parse(&["blake3"]), Ok(Op::Blake3));
    }

    #[test]
    fn rejects_unknown_ops_and_extra_args() {
        let e = Op::parse(&["sha1"]).unwrap_err();
        assert!(e.contains("unknown op \"sha1\""), "{e}");
        let e = Op::parse(&["echo", "x"]).unwrap_err();
        assert!(e.contains("takes no arguments"), "{e}");
        assert!(Op::parse(&[]).is_err());
    }
}
