//! The CUDA side: kernel compilation (NVRTC, at configuration time) and the per-worker
//! device (context, module, reusable buffers), used only on the worker's GPU thread.

mod compile;
mod device;
#[cfg(test)]
mod tests;

pub use compile::{compile_isolated, compile_kernels, nvrtc_present, Compiled, KERNEL_SOURCE};
pub use device::{host_copy, launch_config, DeviceInfo, Functions, Gpu, Launch, SLOTS};

use std::fmt;

/// A CUDA failure while running an op. The device may be unusable afterwards
/// (a kernel fault poisons the context), so callers treat it as the GPU being lost.
#[derive(Debug)]
pub struct GpuError(pub String);

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<cudarc::driver::DriverError> for GpuError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        GpuError(format!("CUDA error: {e}"))
    }
}

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing)
/// into an error, so that no panic reaches nginx.
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(format!("{what} failed: {msg}"))
        }
    }
}
