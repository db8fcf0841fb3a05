//! The CUDA side: kernel compilation (NVRTC, at configuration time), the per-worker device
//! behind the `Device` trait (context, pipeline slots, buffers, the loader ops take their
//! kernels from), and typed errors. It knows no op by name.
//! Used only on the worker's GPU thread, and by the configuration-time compile child.

pub mod buffers;
mod compile;
mod device;
mod error;
#[cfg(any(test, feature = "fault-injection"))]
pub mod fake;
pub mod rendezvous;
#[cfg(test)]
mod rendezvous_tests;
pub mod shared;
#[cfg(test)]
mod tests;

pub use compile::{compile, compile_isolated, entries, nvrtc_present, Compiled, Outcome, Program};
pub use device::{
    align_desc, host_copy, launch_config, Device, DeviceInfo, DeviceLoader, Gpu, Launch, Loader,
    Memory, SLOTS,
};
pub use error::GpuError;

/// Runs `f`, turning a panic (cudarc panics when a library or symbol is missing)
/// into an error, so that no panic reaches nginx.
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(format!("{what} failed: {}", panic_message(&*p))),
    }
}

/// The text a panic carried.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| p.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}
