//! `echo`: the body makes a round trip through GPU memory and comes back unchanged.

use cudarc::driver::PushKernelArg;

use super::{Output, Staged};
use crate::gpu::{launch_config, Functions, GpuError, Launch};

pub const CONTENT_TYPE: &str = "application/octet-stream";

/// The CPU path: the body itself is the answer.
pub fn cpu(input: Vec<u8>) -> Output {
    Output {
        content_type: CONTENT_TYPE,
        body: input,
    }
}

/// The result bytes of a piece in the batch's output: where it was staged.
pub fn result<'a>(out: &'a [u8], piece: &Staged) -> &'a [u8] {
    &out[piece.data_off as usize..(piece.data_off + piece.len) as usize]
}

/// One copy kernel over the whole packed batch: the output has the input's layout.
pub fn gpu_launch(k: &Functions, l: &Launch, data_len: u64) -> Result<(), GpuError> {
    if data_len == 0 {
        return Ok(());
    }
    let mut launch = l.stream.launch_builder(&k.echo_copy);
    launch.arg(&l.data).arg(&l.out).arg(&data_len);
    // SAFETY: echo_copy(const u8*, u8*, u64) reads and writes data_len bytes; the input
    // and output buffers hold at least that many and are 256-byte aligned.
    unsafe { launch.launch(launch_config(data_len.div_ceil(16))) }?;
    Ok(())
}
