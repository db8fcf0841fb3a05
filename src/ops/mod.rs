//! Ops: the kinds of payload work `gpu_process` can run, with their CPU and GPU paths.
//!
//! Each op lives in its own file: argument parsing, the CPU implementation (test
//! reference, fallback and benchmark baseline), the GPU implementation and the encoder.

pub mod blake3;
pub mod echo;

use crate::gpu::{Gpu, GpuError};

/// One configured op, as parsed from `gpu_process <op> [args];`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

pub const OP_NAMES: &str = "echo, blake3";

impl Op {
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

    /// Runs the op on the CPU.
    pub fn run_cpu(self, input: &[u8]) -> Output {
        match self {
            Op::Echo => echo::cpu(input),
            Op::Blake3 => blake3::cpu(input),
        }
    }

    /// Runs the op on the GPU over the `len` bytes already staged in `gpu`'s input buffer.
    pub fn run_gpu(self, gpu: &mut Gpu, len: usize) -> Result<Output, GpuError> {
        match self {
            Op::Echo => echo::gpu(gpu, len),
            Op::Blake3 => blake3::gpu(gpu, len),
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
