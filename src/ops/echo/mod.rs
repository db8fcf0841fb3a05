//! `echo`: the body makes a round trip through GPU memory and comes back unchanged (a
//! diagnostic, and the measure of the path's own cost).

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaFunction, PushKernelArg};

use std::borrow::Cow;

use super::{
    bytes, Assembly, Configured, Decoded, Item, Layout, Op, OpOnDevice, Output, Params, Target,
};
use crate::engine::batch::Piece;
use crate::engine::job::JobError;
use crate::gpu::{host_copy, launch_config, GpuError, Loader, Program};

pub fn parse(args: &[&str]) -> Result<Configured, String> {
    super::no_args("echo", args)?;
    Configured::plain(Echo {
        content_type: Arc::from("application/octet-stream"),
    })
}

fn program() -> Arc<Program> {
    static P: OnceLock<Arc<Program>> = OnceLock::new();
    super::builtin_program(&P, "echo.cu", include_str!("echo.cu"))
}

pub struct Echo {
    content_type: Arc<str>,
}

impl Op for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn programs(&self) -> Vec<Arc<Program>> {
        vec![program()]
    }

    fn splittable(&self) -> bool {
        true
    }

    fn worst_case(&self, _n: usize, bytes: usize) -> (usize, usize) {
        (0, bytes)
    }

    /// The CPU path: the body itself is the answer.
    fn run_cpu(&self, body: Vec<u8>, _: &Params, _: Option<&Decoded>) -> Result<Output, JobError> {
        Ok(Output::new(self.content_type.clone(), body))
    }

    fn finish(&self, result: &[u8], _: Option<&Decoded>) -> Output {
        Output::new(self.content_type.clone(), host_copy(result))
    }

    fn cpu_piece(&self, data: &[u8], _: &Piece, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(data);
    }

    fn assembly(&self, body_len: u64, pieces: u32, piece_len: u64) -> Box<dyn Assembly> {
        Box::new(Pieces {
            content_type: self.content_type.clone(),
            body: vec![0u8; body_len as usize],
            left: pieces,
            piece_len,
        })
    }

    fn load(&self, loader: &mut Loader) -> Result<Option<Box<dyn OpOnDevice>>, GpuError> {
        let copy = match loader {
            Loader::Device(d) => Some(d.function(&program(), "echo_copy")?),
            Loader::Host => None,
        };
        Ok(Some(Box::new(OnDevice { copy })))
    }
}

/// A body cut into pieces: each piece's bytes copied to their place.
struct Pieces {
    content_type: Arc<str>,
    body: Vec<u8>,
    left: u32,
    piece_len: u64,
}

impl Assembly for Pieces {
    fn add(&mut self, index: u32, result: &[u8]) -> bool {
        let at = (index as u64 * self.piece_len) as usize;
        self.body[at..at + result.len()].copy_from_slice(result);
        self.left -= 1;
        self.left == 0
    }

    fn finish(self: Box<Self>) -> Output {
        Output::new(self.content_type, self.body)
    }
}

struct OnDevice {
    /// `echo_copy`; none on the test device.
    copy: Option<CudaFunction>,
}

impl OpOnDevice for OnDevice {
    /// The output has the input's layout.
    fn layout(&self, items: &[Item]) -> Layout {
        bytes::layout(items, Some(&|len| len))
    }

    fn pack(
        &self,
        items: &[Item],
        layout: &Layout,
        _desc: &mut [u8],
        data: &mut [u8],
    ) -> Vec<(usize, JobError)> {
        bytes::pack(items, layout, data)
    }

    /// One copy kernel over the whole packed batch.
    fn launch(&self, layout: &Layout, target: Target) -> Result<(), GpuError> {
        let len = layout.data_len as u64;
        match target {
            Target::Host { data, out, .. } => out[..data.len()].copy_from_slice(data),
            Target::Device(l) if len > 0 => {
                let f = self.copy.as_ref().expect("loaded on a device");
                let mut launch = l.stream.launch_builder(f);
                launch.arg(&l.data).arg(&l.out).arg(&len);
                // SAFETY: echo_copy(const u8*, u8*, u64) reads and writes len bytes; the
                // input and output buffers hold at least that many and are 256-byte aligned.
                unsafe { launch.launch(launch_config(len.div_ceil(16))) }?;
            }
            Target::Device(_) => {}
        }
        Ok(())
    }

    fn result<'o>(
        &self,
        layout: &Layout,
        i: usize,
        out: &'o [u8],
    ) -> Result<Cow<'o, [u8]>, JobError> {
        let p = &layout.items[i];
        Ok(Cow::Borrowed(
            &out[p.out_off as usize..(p.out_off + p.len) as usize],
        ))
    }
}
