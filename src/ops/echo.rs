//! `echo`: the body makes a round trip through GPU memory and comes back unchanged.

use super::Output;
use crate::gpu::{Gpu, GpuError};

pub const CONTENT_TYPE: &str = "application/octet-stream";

pub fn cpu(input: &[u8]) -> Output {
    Output { content_type: CONTENT_TYPE, body: input.to_vec() }
}

/// Host -> device, a copy kernel into a second device buffer, device -> host.
pub fn gpu(gpu: &mut Gpu, len: usize) -> Result<Output, GpuError> {
    let body = gpu.echo(len)?;
    Ok(Output { content_type: CONTENT_TYPE, body })
}
